"""Which features make the model predict a token: activation × gradient at the SAE's hook.

For a text and a target token, the activations at the hook are replaced by the SAE's
reconstruction plus its (constant) error term, so the forward pass is unchanged, and the
target's next-token logit at the last position is differentiated with respect to the
latents. A latent's attribution at a position is z · ∂logit/∂z: the first-order change
in the logit if the latent were removed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.activations.hooks import replaced
from saelab.errors import InputError
from saelab.models import LoadedModel
from saelab.sae.base import SAE


@dataclass
class Attribution:
    tokens: list[str]  # the text's tokens (BOS not included)
    target: str  # the token whose logit is explained
    target_id: int
    logit: float
    per_token: list[list[tuple[int, float]]]  # per token: (feature, attribution), largest |value| first
    top: list[tuple[int, float]]  # features by total attribution over the text


def attribute(
    lm: LoadedModel,
    sae: SAE,
    hook: str,
    text: str,
    target: str | int | None = None,
    top: int = 8,
    max_tokens: int = 256,
) -> Attribution:
    """Attribute the next-token logit of ``target`` after ``text`` (default: the model's own
    top prediction) to the SAE's features at every position."""
    if not lm.causal:
        raise InputError(f"{lm.name} has no LM head: attribution explains a next-token logit")
    tok = lm.tokenizer
    fmt = lm.window_format()
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if not ids:
        raise InputError("the text is empty")
    start = 1 if fmt.bos_id is not None else 0
    x = torch.tensor([([fmt.bos_id] if start else []) + ids], device=lm.device)
    zs: list[Tensor] = []

    def through_sae(a: Tensor) -> Tensor:
        h = a[:, start:].to(sae.W_dec.dtype)
        z = sae.encode(h.detach()).detach().requires_grad_(True)
        zs.append(z)
        recon = sae.decode(z)
        out = a.clone()
        out[:, start:] = (recon + (h - recon).detach()).to(a.dtype)
        return out

    with torch.enable_grad(), replaced(lm.model, {hook: through_sae}):
        logits = lm.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
        if target is None:
            tid = int(logits.argmax())
        elif isinstance(target, int):
            tid = target
        else:
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            if not t_ids:
                raise InputError(f"target {target!r} is not a token")
            tid = int(t_ids[0])
        logits[tid].backward()
    z = zs[0]
    attr = (z * z.grad)[0].detach()  # [T, F]
    vals, idx = attr.abs().topk(min(top, attr.shape[1]), dim=1)
    per_token = [
        [
            (int(i), round(float(attr[t, i]), 4))
            for i, v in zip(ir.tolist(), vr.tolist(), strict=True)
            if v > 0
        ]
        for t, (vr, ir) in enumerate(zip(vals, idx, strict=True))
    ]
    total = attr.sum(0)
    tv, ti = total.abs().topk(min(20, total.numel()))
    return Attribution(
        tokens=[tok.decode([i]) for i in ids],
        target=tok.decode([tid]),
        target_id=tid,
        logit=float(logits[tid].detach()),
        per_token=per_token,
        top=[
            (int(i), round(float(total[i]), 4))
            for i, v in zip(ti.tolist(), tv.tolist(), strict=True)
            if v > 0
        ],
    )
