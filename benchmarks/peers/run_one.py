"""Train one library's TopK SAE on the cached activations and print its figures as JSON.

Run by bench.py and time_to_quality.py inside each library's own virtual environment:

    python run_one.py LIB --train train.npy --heldout heldout.npy --tokens N [--batch 4096]
        [--n-latents 24576] [--k 32] [--threads 2] [--eval-at N1,N2,...] [--dirs dirs.npy]
        [--set key=value ...]   (saelab only: TrainConfig fields)

Each library is driven through its own public classes at its own defaults: its TopK SAE
module, its loss with its dead-latent (AuxK) term if it has one on by default, its default
optimiser and learning-rate rule. The rows are read in the same (pre-shuffled) order by every
library, one batch at a time. Timed: the training steps only (from the first batch to the
last optimiser step); not timed: imports, construction and every held-out evaluation. FVU,
dead % (no firing on the held-out rows) and, with ``--dirs``, the mean max cosine similarity
of the true feature directions to the decoder (MMCS) are measured the same way for all, from
each library's own forward pass; with ``--eval-at`` also after those token counts, the
clock paused, giving a curve of quality against tokens and training seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Lib:
    step: Callable[[int, torch.Tensor], None]
    recon: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    decoder: Callable[[], torch.Tensor]  # [n_latents, d_in]
    evaluating: Callable[[bool], None] = lambda on: None  # enter / leave evaluation



def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def adam_lr(n: int) -> float:
    """2e-4 / sqrt(n / 2^14): the TopK paper's rule."""
    return 2e-4 / math.sqrt(n / 2**14)


# --------------------------------------------------------------------------- the libraries
def saelab_lib(d: int, n: int, k: int, steps: int, batch: int,
               settings: dict[str, Any] | None = None) -> Lib:
    from saelab.activations.source import MatrixSource
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Trainer

    state: dict[str, Any] = {}

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:  # the trainer initialises from data (input scale, geometric-median b_dec)
            cfg = TrainConfig(
                architecture="topk", n_latents=n, k=k, tokens=steps * batch, batch_size=batch,
                progress=False, checkpoint_every_steps=0, log_every_steps=10**9, **(settings or {}))
            t = Trainer(MatrixSource(x), cfg)
            t.begin()
            state["t"] = t
        state["t"].train_step(x)

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = state["t"]  # mid-run: the training SAE on scaled inputs
        z = t.sae.encode(x * t.scale)
        return t.sae.decode(z) / t.scale, z

    return Lib(step, recon, lambda: state["t"].sae.W_dec.detach(), lambda on: state["t"].evaluating(on))


def sparsify_lib(d: int, n: int, k: int, steps: int, batch: int, optimizer: str = "signum") -> Lib:
    """As sparsify's Trainer steps at its defaults (1.3.3): signum (SignSGD under a
    schedule-free wrapper, momentum 0.95, LR 5e-3/sqrt(n/2^14)), no AuxK, b_dec = the first
    batch's mean, unit-norm decoder with the parallel gradient removed. ``optimizer="adam"``
    is its Adam option (LR 2e-4/sqrt(n/2^14), 1000 warm-up steps, linear decay), with the
    TopK paper's AuxK 1/32, as benchmarks/peers/results.md drove it."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    since_fired = torch.zeros(n, dtype=torch.long)
    dead_after = 10_000_000
    sched: Any = None
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt: Any = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / math.sqrt(n / 2**14)),
                                       momentum=0.95)
        opt.train()
        auxk_alpha = 0.0
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam(sae.parameters(), lr=adam_lr(n))
        sched = get_linear_schedule_with_warmup(opt, 1000, steps)
        auxk_alpha = 1 / 32

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_after
        out = sae(x, dead_mask=dead if auxk_alpha else None)
        loss = out.fvu + auxk_alpha * out.auxk_loss if auxk_alpha else out.fvu
        loss.backward()
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sae(x)
        z = torch.zeros(x.shape[0], n).scatter_(1, out.latent_indices, out.latent_acts)
        return out.sae_out, z

    def evaluating(on: bool) -> None:  # schedule-free: evaluate at the averaged point x
        if optimizer == "signum":
            opt.eval() if on else opt.train()

    return Lib(step, recon, lambda: sae.W_dec.detach(), evaluating)


def dictlearn_lib(d: int, n: int, k: int, steps: int, batch: int) -> Lib:
    """Its TopKTrainer at its defaults (LR 2e-4/sqrt(n/2^14), AuxK 1/32, 1000 warm-up steps, no
    decay). It refuses a run of no more steps than its warm-up; such a run warms up over its first
    10% instead (the one change from its defaults, said in the results)."""
    # The package __init__ imports nnsight for its activation buffer; the trainer modules
    # don't need it, so register the package without running __init__.
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("dictionary_learning")
    assert spec is not None and spec.submodule_search_locations
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = pkg
    from dictionary_learning.trainers.top_k import TopKTrainer

    warmup = {} if steps > 1000 else {"warmup_steps": max(1, steps // 10)}
    trainer = TopKTrainer(steps=steps, activation_dim=d, dict_size=n, k=k, layer=0, lm_name="bench",
                          seed=0, device="cpu", **warmup)

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, z = trainer.ae(x, output_features=True)
        return x_hat, z

    return Lib(lambda i, x: trainer.update(i, x), recon,
               lambda: trainer.ae.decoder.weight.detach().t())


def saelens_lib(d: int, n: int, k: int, steps: int, batch: int) -> Lib:
    """As SAELens's SAETrainer steps at its defaults: Adam (lr 3e-4, betas 0.9/0.999, constant),
    gradient-norm clipping at 1, dead latents = no firing for 1000 forward passes."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device="cpu", dtype="float32")
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    passes_since_fired = torch.zeros(n, dtype=torch.long)

    def step(i: int, x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=passes_since_fired > 1000,
                           n_training_steps=i, is_logging_step=False))
        with torch.no_grad():
            fired = (out.feature_acts > 0).float().sum(-2) > 0
            passes_since_fired.add_(1)
            passes_since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(x)
        return sae.decode(z), z

    return Lib(step, recon, lambda: sae.W_dec.detach())


LIBS: dict[str, Callable[..., Lib]] = {
    "saelab": saelab_lib,
    "saelab-bf16": lambda *a: saelab_lib(*a, settings={"matmul_dtype": "bfloat16"}),
    "sparsify": sparsify_lib,
    "sparsify-adam": lambda *a: sparsify_lib(*a, optimizer="adam"),
    "dictlearn": dictlearn_lib,
    "saelens": saelens_lib,
}


@torch.no_grad()
def measure(lib: Lib, held: torch.Tensor, n: int, dirs: torch.Tensor | None) -> dict[str, float]:
    """Held-out FVU, dead fraction and (given the true directions) MMCS."""
    lib.evaluating(True)
    err = tot = 0.0
    fired = torch.zeros(n, dtype=torch.bool)
    mean = held.mean(0)
    for j in range(0, held.shape[0], 4096):
        x = held[j : j + 4096]
        x_hat, z = lib.recon(x)
        err += float((x - x_hat).pow(2).sum())
        tot += float((x - mean).pow(2).sum())
        fired |= (z > 0).any(0)
    out = {"fvu": err / tot, "dead_fraction": 1 - float(fired.float().mean())}
    if dirs is not None:
        dec = lib.decoder().float()
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out["mmcs"] = float((dirs @ dec.t()).max(dim=1).values.mean())
    lib.evaluating(False)
    return out


def parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lib", choices=sorted(LIBS))
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--n-latents", type=int, default=24576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-at", default="", help="token counts to measure after (clock paused)")
    ap.add_argument("--dirs", help="the true feature directions (.npy, unit rows) for MMCS")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="saelab TrainConfig fields (saelab only)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train = np.load(a.train, mmap_mode="r")
    d = train.shape[1]
    steps = a.tokens // a.batch
    settings = {kv.split("=", 1)[0]: parse_value(kv.split("=", 1)[1]) for kv in a.set}
    if settings and not a.lib.startswith("saelab"):
        raise SystemExit("--set is for saelab")
    lib = (saelab_lib(d, a.n_latents, a.k, steps, a.batch, settings) if a.lib == "saelab" and settings
           else LIBS[a.lib](d, a.n_latents, a.k, steps, a.batch))
    held = torch.from_numpy(np.load(a.heldout))
    dirs = torch.from_numpy(np.load(a.dirs)).float() if a.dirs else None
    eval_steps = sorted({max(1, int(t) // a.batch) for t in a.eval_at.split(",") if t} | {steps})
    curve = []
    seconds = 0.0
    per_pass = train.shape[0] // a.batch  # a budget beyond the rows starts another pass
    for i in range(steps):
        j = i % per_pass
        x = torch.from_numpy(np.array(train[j * a.batch : (j + 1) * a.batch]))
        t0 = time.perf_counter()
        lib.step(i, x)
        seconds += time.perf_counter() - t0
        if i + 1 in eval_steps:
            curve.append({"tokens": (i + 1) * a.batch, "seconds": seconds,
                          **measure(lib, held, a.n_latents, dirs)})
    print(json.dumps({"lib": a.lib, "settings": settings, "tokens": steps * a.batch, "seconds": seconds,
                      "tokens_per_s": steps * a.batch / seconds, **curve[-1], "curve": curve,
                      "peak_rss_mib": peak_rss_mib(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
