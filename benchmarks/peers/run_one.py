"""Train one library's TopK SAE on the cached activations and print its figures as JSON.

Run by bench.py inside each library's own virtual environment:

    python run_one.py LIB --train train.npy --heldout heldout.npy --tokens N [--batch 4096]
        [--n-latents 24576] [--k 32] [--threads 2]

Each library is driven through its own public classes: its TopK SAE module, its loss with
its dead-latent (AuxK) term, its default optimiser and learning-rate rule. The rows are
read in the same (pre-shuffled) order by every library, one batch at a time. Timed: the
training steps only (from the first batch to the last optimiser step); not timed: imports,
construction, the held-out evaluation. FVU and dead % are measured the same way for all on
the held-out rows, from each library's own forward pass.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def adam_lr(n: int) -> float:
    """2e-4 / sqrt(n / 2^14): the TopK paper's rule, which every library here defaults to."""
    return 2e-4 / math.sqrt(n / 2**14)


# --------------------------------------------------------------------------- the libraries
def saelab_lib(d: int, n: int, k: int, steps: int, batch: int,
               matmul_dtype: str | None = None) -> tuple[Any, Any]:
    from saelab.activations.source import MatrixSource
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Trainer

    state: dict[str, Any] = {}

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:  # the trainer initialises from data (input scale, geometric-median b_dec)
            cfg = TrainConfig(
                architecture="topk",
                n_latents=n,
                k=k,
                tokens=steps * batch,
                batch_size=batch,
                matmul_dtype=matmul_dtype,
                progress=False,
                checkpoint_every_steps=0,
                log_every_steps=10**9,
            )
            t = Trainer(MatrixSource(x), cfg)
            t.begin()
            state["t"] = t
        state["t"].train_step(x)

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "sae" not in state:  # after the timed steps: end the run as Trainer.run() does
            state["sae"] = state["t"].end()  # (the input scale folded in; scratch memory freed)
        sae = state["sae"]
        z = sae.encode(x)
        return sae.decode(z), z

    return step, recon


def sparsify_lib(d: int, n: int, k: int, steps: int, batch: int) -> tuple[Any, Any]:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=adam_lr(n))
    since_fired = torch.zeros(n, dtype=torch.long)
    auxk_alpha, dead_after = 1 / 32, 10_000_000

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_after
        out = sae(x, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sae(x)
        z = torch.zeros(x.shape[0], n).scatter_(1, out.latent_indices, out.latent_acts)
        return out.sae_out, z

    return step, recon


def dictlearn_lib(d: int, n: int, k: int, steps: int, batch: int) -> tuple[Any, Any]:
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

    trainer = TopKTrainer(
        steps=steps,
        activation_dim=d,
        dict_size=n,
        k=k,
        layer=0,
        lm_name="bench",
        warmup_steps=max(1, steps // 20),
        seed=0,
        device="cpu",
    )

    def step(i: int, x: torch.Tensor) -> None:
        trainer.update(i, x)

    def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, z = trainer.ae(x, output_features=True)
        return x_hat, z

    return step, recon


def saelens_lib(d: int, n: int, k: int, steps: int, batch: int) -> tuple[Any, Any]:
    """As SAELens's SAETrainer steps: Adam (lr 3e-4, its default), gradient-norm clipping at
    1, dead latents = no firing for 1000 forward passes (its dead_feature_window)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device="cpu", dtype="float32")
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    passes_since_fired = torch.zeros(n, dtype=torch.long)

    def step(i: int, x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=passes_since_fired > 1000,
                n_training_steps=i,
                is_logging_step=False,
            )
        )
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

    return step, recon


def saelab_bf16_lib(d: int, n: int, k: int, steps: int, batch: int) -> tuple[Any, Any]:
    """Mixed precision: float32 parameters and Adam, the encoder's matmul in bfloat16."""
    return saelab_lib(d, n, k, steps, batch, matmul_dtype="bfloat16")


LIBS = {
    "saelab": saelab_lib,
    "saelab-bf16": saelab_bf16_lib,
    "sparsify": sparsify_lib,
    "dictlearn": dictlearn_lib,
    "saelens": saelens_lib,
}


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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train = np.load(a.train, mmap_mode="r")
    d = train.shape[1]
    steps = a.tokens // a.batch
    step, recon = LIBS[a.lib](d, a.n_latents, a.k, steps, a.batch)
    t0 = time.perf_counter()
    for i in range(steps):
        x = torch.from_numpy(np.array(train[i * a.batch : (i + 1) * a.batch]))
        step(i, x)
    seconds = time.perf_counter() - t0
    held = torch.from_numpy(np.load(a.heldout))
    err = tot = 0.0
    fired = torch.zeros(a.n_latents, dtype=torch.bool)
    mean = held.mean(0)
    with torch.no_grad():
        for j in range(0, held.shape[0], 4096):
            x = held[j : j + 4096]
            x_hat, z = recon(x)
            err += float((x - x_hat).pow(2).sum())
            tot += float((x - mean).pow(2).sum())
            fired |= (z > 0).any(0)
    print(
        json.dumps(
            {
                "lib": a.lib,
                "tokens": steps * a.batch,
                "seconds": seconds,
                "tokens_per_s": steps * a.batch / seconds,
                "fvu": err / tot,
                "dead_fraction": 1 - float(fired.float().mean()),
                "peak_rss_mib": peak_rss_mib(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
