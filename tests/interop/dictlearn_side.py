"""Run inside dictionary_learning's venv (``.venv-dictlearn``, made by ``make interop-envs``): the
library's own dictionary classes, save format and forward pass, for tests/test_foreign.py. Never
imports saelab.

    python dictlearn_side.py ROOT X.safetensors OUT.safetensors D_IN N_LATENTS K SEED MODEL
        for each dictionary class, save one with random weights as its trainer does, as if
        trained on MODEL's layer-0 residual stream (ROOT/CLASS/ae.pt + config.json), load it
        back with the class's from_pretrained and write its latents and reconstruction of X
        (``<CLASS>.z``, ``<CLASS>.recon``)

The package's ``__init__`` imports nnsight (for its activation buffer, not needed here and not
installable beside torch 2.13), so the package is registered without running it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _package() -> None:
    spec = importlib.util.find_spec("dictionary_learning")
    assert spec is not None and spec.submodule_search_locations
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = pkg


def main(root: str, x_path: str, out_path: str, d: int, n: int, k: int, seed: int, model: str) -> None:
    _package()
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    makers = {
        "AutoEncoder": lambda: AutoEncoder(d, n),
        "AutoEncoderTopK": lambda: AutoEncoderTopK(d, n, k),
        "BatchTopKSAE": lambda: BatchTopKSAE(d, n, k),
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(d, n, k, [n // 4, n - n // 4]),
        "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(d, n),
        "GatedAutoEncoder": lambda: GatedAutoEncoder(d, n),
    }
    g = torch.Generator().manual_seed(seed)
    x = load_file(x_path)["x"]
    out = {}
    for name, make in makers.items():
        ae = make()
        with torch.no_grad():
            for pname, p in ae.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.05))
                if pname == "threshold":
                    p.abs_()
            if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
                ae.threshold.fill_(0.1)  # as training leaves it (else -1: every positive latent)
        folder = Path(root) / name
        folder.mkdir(parents=True)
        torch.save(ae.state_dict(), folder / "ae.pt")
        trainer = {"dict_class": name, "activation_dim": d, "dict_size": n, "k": k, "layer": 0,
                   "lm_name": model, "submodule_name": "resid_post_layer_0"}
        (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"io": "out"}}))
        loaded = type(ae).from_pretrained(str(folder / "ae.pt"))
        with torch.no_grad():
            z = loaded.encode(x)
            out[f"{name}.z"], out[f"{name}.recon"] = z.contiguous(), loaded.decode(z).contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]), sys.argv[8])
