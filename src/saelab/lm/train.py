"""Train a small GPT-2-style language model and its BPE tokenizer from scratch.

Reads top to bottom: tokenizer (byte-level BPE trained on the training documents) →
token arrays (training and held-out documents, each joined by EOS) → model
(``GPT2LMHeadModel``, so every saelab hook, harvest, splice and steering path works on it
unchanged) → the loop (AdamW, linear warm-up then cosine decay, windows drawn at random
from the token array by a generator seeded with (seed, step)) → the held-out loss → the
final model folder, saved in float16 with its tokenizer and ``lm.json``.

The output folder keeps ``tokenizer.json``, the token arrays and ``checkpoint.pt``, so a
killed run resumes where its last checkpoint was and ends with the same weights as a run
that never stopped; ``model/`` appears only when training is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab import stage
from saelab.config import LMConfig
from saelab.data.text import Corpus, Split
from saelab.device import resolve_device
from saelab.errors import InputError
from saelab.io import atomic_torch_save, atomic_write, atomic_write_json

LM_FORMAT_VERSION = 1
"""Version of the LM run folder (checkpoint.pt, lm.json)."""

SPECIAL = "<|endoftext|>"  # BOS, EOS (between documents) and padding, as in GPT-2
TOKENIZER = "tokenizer.json"
CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
INFO = "lm.json"
# Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"device", "progress", "checkpoint_every_steps", "eval_every_steps"}


@dataclass
class LMResult:
    folder: Path            # the finished model folder (loads with saelab.models.load_model)
    heldout_loss: float     # mean next-token cross-entropy on held-out documents, nats
    info: dict[str, Any]


def train_tokenizer(corpus: Corpus, vocab_size: int, path: Path, progress: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on the corpus's training documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in corpus.documents("train")), trainer=trainer)
    atomic_write(path, lambda p: tok.save(str(p)))
    return tok


def tokenize_split(corpus: Corpus, tok: Any, split: Split, path: Path) -> np.ndarray:
    """Every document of one split, tokenised and joined by EOS, as a uint16 array (cached)."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    eos = tok.token_to_id(SPECIAL)
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for enc in tok.encode_batch(batch):
            parts.append(np.asarray([*enc.ids, eos], dtype=np.uint16))
        batch.clear()

    for doc in corpus.documents(split):
        batch.append(doc.text)
        if len(batch) == 64:
            flush()
    flush()
    if not parts:
        raise InputError(f"corpus {corpus.spec!r} has no {split} documents")
    arr = np.concatenate(parts)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, write)
    return np.load(path, mmap_mode="r")


def build_model(cfg: LMConfig, vocab_size: int, eos: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
        activation_function=cfg.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def lr_at(cfg: LMConfig, step: int) -> float:
    steps = cfg.steps()
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_at(tokens: np.ndarray, cfg: LMConfig, step: int, bos: int) -> torch.Tensor:
    """Step ``step``'s windows, [batch, context_length + 1]: BOS followed by context_length
    consecutive corpus tokens starting at offsets drawn by a generator seeded with (seed,
    step). The model reads the first context_length and predicts the last context_length."""
    body = cfg.context_length
    if len(tokens) <= body:
        raise InputError(f"the training text has {len(tokens):,} tokens, fewer than one window ({body + 1})")
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - body, size=cfg.batch_size)
    rows = np.stack([tokens[s:s + body] for s in starts]).astype(np.int64)
    return torch.from_numpy(np.concatenate([np.full((cfg.batch_size, 1), bos), rows], axis=1))


def next_token_loss(model: Any, ids: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from ids[:, :-1]."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: Any, tokens: np.ndarray, cfg: LMConfig, bos: int, device: torch.device) -> float:
    """Mean next-token loss (float32) over consecutive held-out windows (BOS + context_length)."""
    body = cfg.context_length
    n = max(1, min(len(tokens), cfg.eval_tokens) // body)
    rows = np.asarray(tokens[: n * body], dtype=np.int64).reshape(n, body)
    ids = torch.from_numpy(np.concatenate([np.full((n, 1), bos), rows], axis=1))
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in ids.split(cfg.batch_size):
        total += float(next_token_loss(model, chunk.to(device))) * len(chunk)
        count += len(chunk)
    model.train(was)
    return total / count


def _optimizer(model: Any, cfg: LMConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=True)


def lm_settings(cfg: LMConfig) -> stage.Settings:
    """The settings that decide the trained model (what its run folder records)."""
    return stage.Settings.of("language-model run", cfg.model_dump(), free=RESUMABLE_CHANGES)


def _same_run(saved: dict[str, Any], cfg: LMConfig, out: Path) -> None:
    # A setting added after the run was recorded counts as its default there.
    defaults = {k: f.default for k, f in LMConfig.model_fields.items() if not f.is_required()}
    now = lm_settings(cfg)
    then = stage.Settings.of(now.stage, {**defaults, **saved}, free=RESUMABLE_CHANGES)
    now.require_same(then, out, fix="pass a new --out or the same settings")


def train_lm(cfg: LMConfig, out: str | Path) -> LMResult:
    """Train (or resume, or return the finished) model of ``cfg`` in ``out``."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    final = out / MODEL_DIR
    settings = lm_settings(cfg)
    if stage.finished(out, settings) is not None and (final / INFO).is_file():
        info = json.loads((final / INFO).read_text())
        return LMResult(final, float(info["heldout_loss"]), info)
    if (final / INFO).exists():  # finished, by this or an older saelab: same settings, or say which differ
        info = json.loads((final / INFO).read_text())
        _same_run(info["config"], cfg, out)
        stage.mark_finished(out, settings, {"model": str(final), "heldout_loss": info["heldout_loss"]})
        return LMResult(final, float(info["heldout_loss"]), info)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = out / "lm_config.json"
    if run_cfg.exists():
        _same_run(json.loads(run_cfg.read_text()), cfg, out)
    else:
        atomic_write_json(run_cfg, cfg.model_dump())
    corpus = Corpus(cfg.corpus, heldout_fraction=cfg.heldout_fraction)
    t0 = time.perf_counter()
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"tokenizer: byte-level BPE, {cfg.vocab_size:,} tokens, on {cfg.corpus}", flush=True)
    tok = train_tokenizer(corpus, cfg.vocab_size, out / TOKENIZER, cfg.progress)
    say("tokenising the training and held-out documents", flush=True)
    train_ids = tokenize_split(corpus, tok, "train", out / "tokens-train.npy")
    held_ids = tokenize_split(corpus, tok, "heldout", out / "tokens-heldout.npy")
    eos = tok.token_to_id(SPECIAL)
    prep_s = time.perf_counter() - t0
    say(f"{len(train_ids):,} training and {len(held_ids):,} held-out tokens ({prep_s:.0f} s)", flush=True)

    device = resolve_device(cfg.device)
    model = build_model(cfg, tok.get_vocab_size(), eos).to(device)
    opt = _optimizer(model, cfg)
    steps = cfg.steps()
    step, history, train_s = 0, [], 0.0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, train_s = state["step"], state["history"], state["train_seconds"]
        say(f"resuming at step {step:,} of {steps:,}", flush=True)

    def save_checkpoint() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "history": history, "train_seconds": train_s,
                           "format_version": LM_FORMAT_VERSION}, ckpt)

    tokens_per_step = cfg.batch_size * cfg.context_length
    model.train()
    bar = tqdm(total=steps * tokens_per_step, initial=step * tokens_per_step, unit="tok", unit_scale=True,
               dynamic_ncols=True, disable=not cfg.progress, desc="training")
    loss_ema = None
    try:
        while step < steps:
            t = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            ids = batch_at(train_ids, cfg, step, eos).to(device)
            loss = next_token_loss(model, ids, bf16=cfg.precision == "bfloat16")
            if not torch.isfinite(loss):
                raise InputError(f"the loss became {float(loss)} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            train_s += time.perf_counter() - t
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
            record: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step, "loss": value}
            if step % cfg.eval_every_steps == 0 or step == steps:
                record["heldout_loss"] = heldout_loss(model, held_ids, cfg, eos, device)
            history.append(record)
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{loss_ema:.3f}", **({"heldout": f"{record['heldout_loss']:.3f}"}
                                                       if "heldout_loss" in record else {}))
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < steps:
                save_checkpoint()
    finally:
        bar.close()
    save_checkpoint()

    model.half().float()  # the saved model is float16: measure what users will load
    held = heldout_loss(model, held_ids, cfg, eos, device)
    info = {
        "format_version": LM_FORMAT_VERSION,
        "config": cfg.model_dump(),
        "heldout_loss": held,
        "heldout_loss_float32_weights": history[-1]["heldout_loss"],
        "final_train_loss_ema": loss_ema,
        "train_tokens_seen": steps * tokens_per_step,
        "corpus_train_tokens": len(train_ids),
        "corpus_heldout_tokens": len(held_ids),
        "heldout_tokens_measured": min(len(held_ids), cfg.eval_tokens) // cfg.context_length
        * cfg.context_length,
        "train_seconds": round(train_s, 1),
        "tokens_per_second": round(steps * tokens_per_step / max(train_s, 1e-9)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_curve": [{"tokens": r["tokens"], "heldout_loss": r["heldout_loss"]}
                          for r in history if "heldout_loss" in r],
    }
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                     pad_token=SPECIAL, unk_token=None)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        model.to("cpu").half().save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        atomic_write_json(tmp / INFO, info)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp and save_pretrained leave owner-only modes
            f.chmod(0o755 if f.is_dir() else 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stage.mark_finished(out, settings, {"model": str(final), "heldout_loss": held}, seconds=train_s)
    return LMResult(final, float(held), info)


__all__ = ["LMResult", "build_model", "heldout_loss", "train_lm", "train_tokenizer"]
