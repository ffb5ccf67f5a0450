"""Which torch device a stage runs on: 'auto' (CUDA when there is one), 'cpu', 'cuda[:N]'."""

from __future__ import annotations

import torch

from saelab.errors import SaelabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SaelabError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaelabError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return dev
