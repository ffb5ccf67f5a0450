"""Plot the FVU-vs-L0 frontier of the TopK and ReLU-L1 sweeps and write results.md.

    python benchmarks/real_sae/frontier.py      # after run.sh
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent


def points(arch: str) -> list[dict]:
    out = []
    for f in sorted(HERE.glob(f"frontier-{arch}-*.json")):
        r = json.loads(f.read_text())
        r["param"] = f.stem.split("-")[-1]
        out.append(r)
    return sorted(out, key=lambda r: r["l0"])


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arch, label, marker in (("topk", "TopK (k = 16, 32, 64)", "o"),
                                ("relu", "ReLU + L1 (λ sweep)", "s")):
        pts = points(arch)
        ax.plot([p["l0"] for p in pts], [p["fvu"] for p in pts], marker=marker, label=label)
        for p in pts:
            ax.annotate(("k=" if arch == "topk" else "λ=") + p["param"], (p["l0"], p["fvu"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token, held-out)")
    ax.set_ylabel("FVU (held-out)")
    ax.set_title("SmolLM2-135M blocks.6.hook_resid_post, 16x (9216 latents), 1M tokens, batch 1024")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "frontier.png", dpi=130)

    rows = []
    for arch in ("topk", "relu"):
        for p in points(arch):
            rows.append(f"| {arch} | {p['param']} | {p['l0']:.1f} | {p['fvu']:.4f} | "
                        f"{100 * p['dead_fraction']:.1f}% |")
    (HERE / "frontier.md").write_text(
        "| arch | k or λ | L0 | FVU | dead |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print((HERE / "frontier.md").read_text())


if __name__ == "__main__":
    main()
