"""Which features fire on a piece of text: the model run to the SAE's hook, token by token.

This is what the viewer's live text box shows, and what a script asks of an SAE about
its own text: per token, the strongest features that fire; over the text, the features
with the highest peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.activations.hooks import run_hooked
from saelab.models import LoadedModel
from saelab.sae.base import SAE


@dataclass
class TextFeatures:
    tokens: list[str]  # the text's tokens as text (the window's BOS/EOS left out)
    per_token: list[list[tuple[int, float]]]  # per token, [(feature, activation)] strongest first
    top: list[tuple[int, float]]  # the features with the highest peak over the text
    truncated: bool  # the text had more than max_tokens tokens; the rest was left out


@torch.no_grad()
def features_on_text(lm: LoadedModel, sae: SAE, hook: str, text: str, max_tokens: int = 256,
                     per_token: int = 8, top: int = 20) -> TextFeatures:
    """The ``per_token`` strongest firing features at each token of ``text`` (framed as the
    model's windows are: BOS first, EOS last where the model has them), and the ``top``
    features by their peak activation."""
    tok, fmt = lm.tokenizer, lm.window_format()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    framed = ([fmt.bos_id] if fmt.bos_id is not None else []) + ids \
        + ([fmt.end_id] if fmt.end_id is not None else [])
    start = 1 if fmt.bos_id is not None else 0
    t = torch.tensor([framed], device=lm.device)
    cap, _ = run_hooked(lm.model, t, torch.ones_like(t), capture=[hook])
    z_TF = sae.encode(cap[hook][0, start : start + len(ids)].float())
    vals_TK, idx_TK = z_TF.topk(min(per_token, z_TF.shape[1]), dim=1)
    rows = [[(int(i), round(float(v), 3)) for v, i in zip(vr.tolist(), ir.tolist(), strict=True) if v > 0]
            for vr, ir in zip(vals_TK, idx_TK, strict=True)]
    peak_F = z_TF.amax(0) if len(ids) else torch.zeros(z_TF.shape[1])
    pv, pi = peak_F.topk(min(top, peak_F.numel()))
    peaks = [(int(i), round(float(v), 3)) for v, i in zip(pv.tolist(), pi.tolist(), strict=True) if v > 0]
    return TextFeatures(tokens=[tok.decode([i]) for i in ids], per_token=rows, top=peaks,
                        truncated=truncated)


__all__ = ["TextFeatures", "features_on_text"]
