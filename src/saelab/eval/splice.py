"""Measure an SAE inside its model: splice the reconstruction in at its hook point.

On held-out windows the model runs clean; with the SAE's reconstruction in place of the
activations at the hook ("spliced") on the positions the SAE was trained on (BOS/CLS/SEP and
padding are left alone, as in harvest, and as SAELens leaves special tokens); with every
position zeroed, BOS included (the zero ablation of SAELens's ``get_recons_loss`` and SAEBench);
with only the SAE's positions zeroed; and with them set to their mean over the evaluation tokens.

For a causal LM the report is next-token cross-entropy under each condition, the CE loss
recovered (CE_zero − CE_spliced) / (CE_zero − CE_clean) under both conventions:
``ce_recovered`` (the default, comparable with SAELens and SAEBench tables: zero ablation on
every position, ``ce_zero``) and ``ce_recovered_sae_positions`` (saelab 0.5's: zero ablation
on the SAE's positions, ``ce_zero_sae_positions``), each described in the JSON's
``ce_recovered_conventions``; the mean-ablation variant, ΔCE = CE_spliced − CE_clean and
KL(clean ‖ spliced). For an encoder without an LM head it
is the cosine similarity of mean-pooled embeddings to the clean ones. Either way FVU, L0,
dead and dense fractions of the SAE on the same tokens come with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab import stage
from saelab.activations.harvest import first_tokens
from saelab.activations.hooks import run_hooked
from saelab.config import TextConfig
from saelab.data.text import TokenBatch, text_batches
from saelab.errors import InputError
from saelab.eval.metrics import ReconstructionAccumulator
from saelab.models import LoadedModel
from saelab.sae.base import SAE, check_sae_fits
from saelab.sae.foreign import weights_file

CONDITIONS = ("spliced", "zero", "mean")  # on the SAE's positions
# SAELens's get_recons_loss and SAEBench zero-ablate every position, BOS included (a causal LM only).
ZERO_EVERY_POSITION = "zero_every_position"
CONVENTIONS = {
    "ce_recovered": "SAELens/SAEBench (the default): the reconstruction replaces all but special "
                    "tokens; the zero ablation (ce_zero) replaces every position, BOS included",
    "ce_recovered_sae_positions": "saelab 0.5: the reconstruction and the zero ablation "
                                  "(ce_zero_sae_positions) both replace the positions the SAE reads "
                                  "(BOS, EOS and padding untouched)",
    "ce_recovered_mean": "mean ablation (ce_mean) on the positions the SAE reads",
}
CONVENTION_VERSION = 2  # ce_recovered's meaning: 2 = SAELens's (figures saved under 1 are measured again)


@dataclass
class SpliceResult:
    model: str
    hook_name: str
    tokens: int
    fvu: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    cossim: float | None = None
    relative_reconstruction_bias: float | None = None
    # causal LMs
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None  # every position zeroed, BOS included (SAELens, SAEBench)
    ce_zero_sae_positions: float | None = None
    ce_mean: float | None = None
    ce_recovered: float | None = None  # SAELens/SAEBench convention
    ce_recovered_sae_positions: float | None = None  # saelab 0.5's
    ce_recovered_mean: float | None = None
    delta_ce: float | None = None
    kl: float | None = None
    # encoders
    cos_spliced: float | None = None
    cos_zero: float | None = None
    cos_mean: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.ce_recovered is not None:
            out["ce_recovered_conventions"] = CONVENTIONS
        return out


def recovered(ce_clean: float, ce_patched: float, ce_ablated: float) -> float:
    """(CE_ablated − CE_patched) / (CE_ablated − CE_clean): 1 = as good as clean, 0 = as bad
    as the ablation."""
    return (ce_ablated - ce_patched) / (ce_ablated - ce_clean)


def _pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens, as sentence-transformers pools MiniLM."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def _replace(mask: Tensor, fill: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        return torch.where(mask.unsqueeze(-1), fill(x).to(x.dtype), x)
    return fn


class _CausalTotals:
    """Running CE sums per condition and KL(clean ‖ spliced). Log-probabilities are taken in
    float64 one window at a time, so memory stays at a window × vocab, not a batch × vocab
    per condition."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ce = dict.fromkeys(("clean", *CONDITIONS, ZERO_EVERY_POSITION), 0.0)
        self.kl = 0.0

    def add(self, batch: TokenBatch, clean: Tensor, name: str, logits: Tensor) -> None:
        """Add condition ``name``'s logits (and, with "spliced", the clean CE and the KL)."""
        # Predict token t+1 from position t, wherever token t+1 is real text.
        target = batch.input_ids[:, 1:].to(clean.device)
        valid = batch.attention_mask[:, 1:].bool().to(target.device)
        first = name == CONDITIONS[0]
        if first:
            self.tokens += int(valid.sum())
        for i in range(target.shape[0]):
            v, t = valid[i], target[i][valid[i]]
            lp = F.log_softmax(logits[i, :-1][v].double(), dim=-1)
            self.ce[name] -= float(lp.gather(-1, t[:, None]).sum())
            if first:
                lc = F.log_softmax(clean[i, :-1][v].double(), dim=-1)
                self.ce["clean"] -= float(lc.gather(-1, t[:, None]).sum())
                self.kl += float((lc.exp() * (lc - lp)).sum())

    def result(self) -> dict[str, float]:
        ce = {k: v / max(self.tokens, 1) for k, v in self.ce.items()}
        return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce[ZERO_EVERY_POSITION],
                "ce_zero_sae_positions": ce["zero"], "ce_mean": ce["mean"],
                "ce_recovered": recovered(ce["clean"], ce["spliced"], ce[ZERO_EVERY_POSITION]),
                "ce_recovered_sae_positions": recovered(ce["clean"], ce["spliced"], ce["zero"]),
                "ce_recovered_mean": recovered(ce["clean"], ce["spliced"], ce["mean"]),
                "delta_ce": ce["spliced"] - ce["clean"], "kl": self.kl / max(self.tokens, 1)}


@torch.no_grad()
def splice_eval(sae: SAE, lm: LoadedModel, text: TextConfig, tokens: int = 4096,
                hook: str | None = None, progress: bool = True) -> SpliceResult:
    """Evaluate ``sae`` spliced into ``lm`` on about ``tokens`` held-out tokens."""
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise InputError("the SAE's cfg.json names no hook point; pass --hook")
    check_sae_fits(sae, lm, hook)
    dev = lm.device
    sae = sae.to(dev).eval()
    batches = first_tokens(text_batches(lm, text, "heldout"), tokens)
    if not batches:
        raise InputError(f"corpus {text.corpus!r} has no held-out documents")

    # A transcoder reads ``hook`` and writes its reconstruction at ``out`` (the MLP's output);
    # an SAE reads and writes the same hook.
    out_hook = sae.cfg.hook_name_out or hook
    captured = [hook] if out_hook == hook else [hook, out_hook]
    # Pass 1 (only up to the hook): the mean activation for mean ablation.
    total, count = torch.zeros(sae.d_target, dtype=torch.float64, device=dev), 0
    for b in batches:
        cap, _ = run_hooked(lm.model, b.input_ids.to(dev), b.attention_mask.to(dev), capture=[out_hook])
        rows = cap[out_hook][b.content_mask.to(dev)]
        total += rows.double().sum(0)
        count += rows.shape[0]
    mean = (total / max(count, 1)).float()

    acc = ReconstructionAccumulator(sae.n_latents)
    causal = _CausalTotals()
    cos = dict.fromkeys(CONDITIONS, 0.0)
    windows = 0
    bar = tqdm(batches, desc="splice eval", unit="batch", dynamic_ncols=True, disable=not progress)
    for b in bar:
        ids, attn = b.input_ids.to(dev), b.attention_mask.to(dev)
        mask = b.content_mask.to(dev)
        cap, clean = run_hooked(lm.model, ids, attn, capture=captured, need_output=True)
        x = cap[hook][mask].to(sae.W_dec.dtype)
        z = sae.encode(x)
        recon = sae.decode(z)
        skip = sae.skip_term(x)
        acc.add(cap[out_hook][mask].to(sae.W_dec.dtype), recon if skip is None else recon + skip, z)
        inputs = cap[hook]  # the input of the replaced layer is the clean run's: nothing before it changed
        fills: dict[str, Callable[[Tensor], Tensor]] = {
            "spliced": (lambda a: sae(a)) if out_hook == hook else (lambda a, inputs=inputs: sae(inputs)),
            "zero": torch.zeros_like,
            "mean": lambda a: mean.expand_as(a),
        }
        where = dict.fromkeys(fills, mask)
        if lm.causal:
            fills[ZERO_EVERY_POSITION], where[ZERO_EVERY_POSITION] = torch.zeros_like, attn.bool()
        # One condition at a time, reduced at once: only the clean output is kept alongside.
        for name, fill in fills.items():
            _, out = run_hooked(lm.model, ids, attn, replace={out_hook: _replace(where[name], fill)},
                                need_output=True)
            if lm.causal:
                causal.add(b, clean.logits, name, out.logits)
            else:
                ref = _pool(clean.last_hidden_state, attn)
                pooled = _pool(out.last_hidden_state, attn)
                cos[name] += float(F.cosine_similarity(ref, pooled, dim=-1).sum())
            del out
        windows += ids.shape[0]
    bar.close()
    m = acc.result()
    result = SpliceResult(model=lm.name, hook_name=hook, tokens=m.rows, fvu=m.fvu, l0=m.l0,
                          dead_fraction=m.dead_fraction, dense_fraction=m.dense_fraction, cossim=m.cossim,
                          relative_reconstruction_bias=m.relative_reconstruction_bias)
    if lm.causal:
        for k, v in causal.result().items():
            setattr(result, k, v)
    else:
        result.cos_spliced, result.cos_zero, result.cos_mean = (cos[c] / windows for c in CONDITIONS)
    return result


def splice_settings(sae_dir: Path, text: TextConfig, tokens: int, hook: str | None) -> stage.Settings:
    """The settings that decide a splice evaluation of the SAE in ``sae_dir``."""
    return stage.Settings.of("splice evaluation", {
        "sae": stage.file_identity(weights_file(Path(sae_dir))), "tokens": tokens, "hook": hook,
        "convention": CONVENTION_VERSION, **text.model_dump()}, free=("device", "batch_size"))


def saved_splice_eval(sae_dir: str | Path, out: str | Path, model: Callable[[], LoadedModel],
                      text: TextConfig, tokens: int, hook: str | None = None,
                      progress: bool = True) -> tuple[dict[str, Any], bool]:
    """:func:`splice_eval` of the SAE in ``sae_dir``, its figures written to the JSON file
    ``out``; a second call with the same settings reads them back without loading the
    model (``model`` is only called when the evaluation runs). Returns (figures, reused)."""
    settings = splice_settings(Path(sae_dir), text, tokens, hook)
    return stage.json_result(Path(out), settings, lambda: splice_eval(
        SAE.load(sae_dir), model(), text, tokens=tokens, hook=hook, progress=progress).as_dict())
