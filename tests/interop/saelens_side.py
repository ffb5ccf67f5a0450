"""Run inside the SAELens venv (``.venv-saelens``, made by ``make saelens-env``): SAELens's own
loader and forward pass, for tests/test_saelens.py. Never imports saelab.

    python saelens_side.py read X.safetensors OUT.safetensors DIR [DIR ...]
        load each SAE folder with sae_lens.SAE.load_from_disk; write its latents and
        reconstruction of X (``<i>.z``, ``<i>.recon``) and print its names as JSON lines
    python saelens_side.py write DIR ARCH D_IN D_SAE K SEED [HOOK MODEL]
        save a SAELens SAE of ARCH (standard, topk, jumprelu, gated) with random weights, named
        as reading HOOK of MODEL (default blocks.1.hook_resid_post of "tiny")
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def read(x_path: str, out_path: str, dirs: list[str]) -> None:
    from sae_lens import SAE

    x = load_file(x_path)["x"]
    out = {}
    for i, d in enumerate(dirs):
        sae = SAE.load_from_disk(d, device="cpu")
        with torch.no_grad():
            z = sae.encode(x)
            out[f"{i}.z"], out[f"{i}.recon"] = z.contiguous(), sae.decode(z).contiguous()
        meta = sae.cfg.metadata
        print(json.dumps({"dir": d, "architecture": sae.cfg.architecture(),
                          "hook_name": getattr(meta, "hook_name", None),
                          "model_name": getattr(meta, "model_name", None),
                          "k": getattr(sae.cfg, "k", None)}))
    save_file(out, out_path)


def write(folder: str, arch: str, d_in: int, d_sae: int, k: int, seed: int,
          hook: str = "blocks.1.hook_resid_post", model: str = "tiny") -> None:
    import sae_lens as sl

    kinds = {"standard": (sl.StandardSAE, sl.StandardSAEConfig, {}),
             "topk": (sl.TopKSAE, sl.TopKSAEConfig, {"k": k}),
             "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {}),
             "gated": (sl.GatedSAE, sl.GatedSAEConfig, {})}
    cls, cfg_cls, extra = kinds[arch]
    meta = sl.saes.sae.SAEMetadata(hook_name=hook, model_name=model)
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.05))
            if name == "threshold":
                p.abs_()
    sae.save_model(folder)


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        write(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]), *sys.argv[8:10])
