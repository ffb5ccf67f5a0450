"""The hook identity on the real Gemma-3-270M (`make gemma` installs it): in every block,
resid_post − resid_pre = attn_out + mlp_out, and block 0's resid_pre is the scaled embedding.
Prints the worst difference per block relative to the size of what was added, and writes
hook_identity.md beside this script. The same identity on a small random model of every family
is a unit test (tests/test_hooks.py); this is the check on the real checkpoint.

    .venv/bin/python benchmarks/gemma3/hook_identity.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.activations.hooks import run_hooked
from saelab.models import load_model

HERE = Path(__file__).parent


def main() -> None:
    lm = load_model("gemma3-270m")
    text = "The committee adjourned at noon, and the members walked out into the rain."
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert int(ids[0, 0]) == lm.window_format().bos_id == 2
    names = [f"blocks.{i}.{k}" for i in range(lm.n_layers)
             for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    with torch.no_grad():
        cap, _ = run_hooked(lm.model, ids, capture=names)
        embed = lm.model.model.embed_tokens
        raw = embed.weight[ids] * (lm.d_model ** 0.5)
    rows = ["| block | max abs(resid_post − resid_pre − attn_out − mlp_out) | max abs(attn_out + mlp_out) "
            "| ratio |",
            "|---:|---:|---:|---:|"]
    worst = 0.0
    for i in range(lm.n_layers):
        added = cap[f"blocks.{i}.hook_attn_out"] + cap[f"blocks.{i}.hook_mlp_out"]
        diff = cap[f"blocks.{i}.hook_resid_post"] - cap[f"blocks.{i}.hook_resid_pre"] - added
        ratio = float(diff.abs().max() / added.abs().max())
        worst = max(worst, ratio)
        rows.append(f"| {i} | {float(diff.abs().max()):.3g} | {float(added.abs().max()):.4g} | {ratio:.2g} |")
    emb_err = float((cap["blocks.0.hook_resid_pre"] - raw).abs().max() / raw.abs().max())
    md = "\n".join([
        "# Gemma-3-270M: the hook identity on the real checkpoint", "",
        f"`python benchmarks/gemma3/hook_identity.py`, {ids.shape[1]} tokens (BOS = 2 first). Worst relative "
        f"difference over the {lm.n_layers} blocks: {worst:.2g} (float32 rounding). Block 0's hook_resid_pre "
        f"against embed_tokens.weight[ids] × √{lm.d_model}: relative difference {emb_err:.2g}.", "",
        *rows, ""])
    (HERE / "hook_identity.md").write_text(md)
    print(md)
    assert worst < 1e-4 and emb_err < 1e-5


if __name__ == "__main__":
    main()
