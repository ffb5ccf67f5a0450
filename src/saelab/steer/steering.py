"""Steering a model with SAE features, as in *Scaling Monosemanticity*.

At the SAE's hook the activations x are encoded, chosen latents are changed, and the change
is decoded back into the residual stream while the SAE's error term stays:

    x' = x + (z' − z) W_dec + Σ add_f · W_dec[f]

so with no edit x' is x exactly (the delta is exactly zero), and with an edit only the
edited features move. Edits: ``clamp`` (set z_f to a value), ``scale`` (multiply z_f),
``ablate`` (z_f = 0) and ``add`` (add a multiple of the decoder direction, whether or not
the feature fires). The first position of a window (BOS) is left alone, as in training.

A transcoder reads one hook (the MLP's input) and writes another (its output): the latents
are read at the first and the delta is added at the second, so the MLP's output moves by
exactly what the edited features write, its error term kept.

:func:`generate` runs greedy generation with the edit in place (the KV cache on: each
step edits only the new position) and returns the clean and the steered continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from saelab.activations.hooks import replaced
from saelab.errors import InputError
from saelab.models import LoadedModel
from saelab.sae.base import SAE

Mode = Literal["clamp", "scale", "ablate", "add"]
MODES: tuple[str, ...] = ("clamp", "scale", "ablate", "add")


@dataclass(frozen=True)
class Edit:
    """One change to one feature."""

    feature: int
    mode: Mode
    value: float = 0.0


def check_edits(sae: SAE, edits: Sequence[Edit]) -> None:
    for e in edits:
        if not 0 <= e.feature < sae.n_latents:
            raise InputError(f"feature {e.feature} does not exist: the SAE has 0 to {sae.n_latents - 1}")
        if e.mode not in MODES:
            raise InputError(f"edit mode {e.mode!r} is not one of {', '.join(MODES)}")


def _delta(sae: SAE, h: Tensor, edits: Sequence[Edit], feats: Tensor) -> Tensor:
    """What ``edits`` change in the SAE's output at inputs ``h`` [..., d_in]: [..., d_out]."""
    z_f = sae.encode(h)[..., feats]
    new = z_f.clone()
    add = torch.zeros(*h.shape[:-1], sae.d_target, dtype=h.dtype, device=h.device)
    for i, e in enumerate(edits):
        if e.mode == "clamp":
            new[..., i] = e.value
        elif e.mode == "scale":
            new[..., i] = z_f[..., i] * e.value
        elif e.mode == "ablate":
            new[..., i] = 0.0
        else:  # add: the decoder direction, firing or not
            add = add + e.value * sae.W_dec[e.feature]
    return (new - z_f) @ sae.W_dec[feats] + add


def steering_hooks(sae: SAE, hook: str, edits: Sequence[Edit],
                   skip_first: bool = True) -> dict[str, Callable[[Tensor], Tensor]]:
    """The hook-point functions that apply ``edits``: one at ``hook`` for an SAE; for a
    transcoder one that reads its input at ``hook`` and one that adds the delta at its output
    hook. With ``skip_first``, the first call (the prompt, starting with BOS) leaves position 0
    alone; later calls (one new position each, with the KV cache) edit every position."""
    check_edits(sae, edits)
    state: dict[str, Any] = {"first": skip_first}
    feats = torch.tensor([e.feature for e in edits], dtype=torch.long, device=sae.device)

    def read(x: Tensor) -> Tensor:
        start = 1 if state["first"] and x.shape[1] > 0 else 0
        state["first"] = False
        h = x[:, start:].to(sae.W_dec.dtype)
        state["start"], state["delta"] = start, _delta(sae, h, edits, feats)
        return x

    def write(y: Tensor) -> Tensor:
        out = y.clone()
        start = state["start"]
        out[:, start:] = (y[:, start:].to(sae.W_dec.dtype) + state["delta"]).to(y.dtype)
        return out

    def same_hook(x: Tensor) -> Tensor:
        return write(read(x))

    if not edits:
        return {}
    out_hook = sae.cfg.hook_name_out
    if out_hook is None or out_hook == hook:
        return {hook: same_hook}
    return {hook: read, out_hook: write}


def steering_fn(sae: SAE, edits: Sequence[Edit], skip_first: bool = True) -> Callable[[Tensor], Tensor]:
    """The function at an SAE's hook that applies ``edits`` (see :func:`steering_hooks`)."""
    fns = steering_hooks(sae, "hook", edits, skip_first)
    return fns.get("hook", lambda x: x)


@dataclass
class Continuations:
    prompt: str
    clean: str
    steered: str


@torch.no_grad()
def generate(
    lm: LoadedModel, sae: SAE, hook: str, prompt: str, edits: Sequence[Edit], max_new_tokens: int = 40
) -> Continuations:
    """Greedy continuations of ``prompt`` without and with ``edits`` at ``hook``."""
    if not lm.causal:
        raise InputError(f"{lm.name} has no LM head: steering generation needs a causal LM")
    tok = lm.tokenizer
    fmt = lm.window_format()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = ([fmt.bos_id] if fmt.bos_id is not None else []) + ids
    x = torch.tensor([ids], device=lm.device)
    kwargs = {
        "attention_mask": torch.ones_like(x),
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": fmt.pad_id,
        "use_cache": True,
    }
    clean = lm.model.generate(x, **kwargs)
    with replaced(lm.model, steering_hooks(sae, hook, edits, skip_first=fmt.bos_id is not None)):
        steered = lm.model.generate(x, **kwargs)
    n = x.shape[1]
    return Continuations(
        prompt,
        tok.decode(clean[0, n:], skip_special_tokens=True),
        tok.decode(steered[0, n:], skip_special_tokens=True),
    )


@torch.no_grad()
def next_token_logprobs(
    lm: LoadedModel, sae: SAE, hook: str, ids: Tensor, edits: Sequence[Edit] = ()
) -> Tensor:
    """Log-probabilities [B, T, vocab] of the next token with ``edits`` in place (one pass)."""
    with replaced(lm.model, steering_hooks(sae, hook, edits)):
        out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return torch.log_softmax(out.logits.double(), dim=-1)
