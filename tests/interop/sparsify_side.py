"""Run inside sparsify's venv (``.venv-sparsify``, made by ``make interop-envs``): EleutherAI
sparsify's own classes, save format and forward pass, for tests/test_foreign.py. Never imports
saelab.

    python sparsify_side.py RUN_DIR X.safetensors OUT.safetensors D_IN N_LATENTS K SEED MODEL LAYERS
        save a run of sparse coders on MODEL with random weights the way sparsify's trainer does
        (one folder per hookpoint under RUN_DIR, in the model's module list LAYERS, e.g. layers;
        the run's config.json beside them), load each back with SparseCoder.load_from_disk and
        write its dense latents and output on X (``<hookpoint>.z``, ``<hookpoint>.recon``)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(run: str, x_path: str, out_path: str, d: int, n: int, k: int, seed: int, model: str,
         layers: str) -> None:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    root = Path(run)
    attn = "attn" if layers == "h" else "self_attn"  # GPT-2's module names, or Llama's
    cases = {
        f"{layers}.0": SparseCoderConfig(num_latents=n, k=k),
        f"{layers}.0.mlp": SparseCoderConfig(num_latents=n, k=k, transcode=True, skip_connection=True),
        f"{layers}.0.{attn}": SparseCoderConfig(expansion_factor=n // d, k=k),
    }
    g = torch.Generator().manual_seed(seed)
    x = load_file(x_path)["x"]
    out = {}
    for name, cfg in cases.items():
        sae = SparseCoder(d, cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.05))
        sae.save_to_disk(root / name)
        loaded = SparseCoder.load_from_disk(root / name)
        with torch.no_grad():
            top_acts, top_indices, _ = loaded.encode(x)
            z = torch.zeros(x.shape[0], loaded.num_latents).scatter_(1, top_indices, top_acts)
            out[f"{name}.z"], out[f"{name}.recon"] = z, loaded(x).sae_out.contiguous()
    RunConfig(sae=SparseCoderConfig(num_latents=n, k=k), model=model,
              hookpoints=list(cases)).save_json(root / "config.json")
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]), sys.argv[8], sys.argv[9])
