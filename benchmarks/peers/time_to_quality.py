"""Time to a quality: held-out FVU against tokens and against training seconds, saelab and its
peers each at their own defaults, on synthetic activations with known features.

    bash benchmarks/peers/setup.sh     # one venv per peer (or make interop-envs: the test venvs)
    python benchmarks/peers/time_to_quality.py [--tokens 2883584] [--repeats 2]

The data: d_in 512, sparse non-negative combinations (16 active on average) of 4,096 random
unit directions plus noise; the training rows and 65,536 held-out rows are drawn over the same
directions, so the decoder can be scored against them (MMCS). Every library trains a TopK SAE
(4,096 latents, k 32, batch 4096) on the same rows in the same order, each in its own process
and venv (run_one.py), with its own optimiser, learning-rate rule, schedule and dead-latent
handling: nothing is re-tuned to ours. Each run is measured at every ``--eval-at`` budget with
the clock paused, which gives curves of quality against tokens and seconds from one run per
library and repeat; the libraries alternate their order between repeats, and the table takes
the median seconds. The one schedule here that depends on the whole budget is saelab's with
Adam (its LR decays over the run's last 20%): its points before the end are what a longer run
passes through without that decay, not what a run of that budget would give. (sparsify and
saelab's signum average instead of decaying; SAELens keeps its LR constant; dictionary_learning
warms up over 1,000 steps and, at its default decay_start=None, never decays.)

Writes benchmarks/peers/time_to_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import feature_dirs, make_data

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
D, FEATURES, N_LATENTS, K, BATCH, HELD_ROWS = 512, 4096, 4096, 32, 4096, 65_536


def venv(name: str) -> Path:
    """The peer's benchmark venv (setup.sh), else the test venv (make interop-envs)."""
    own = HERE / ".venvs" / name
    return own if (own / "bin" / "python").exists() else ROOT / f".venv-{name}"


LIBS = {  # run_one.py's name, the venv, extra arguments, what the table calls it
    "saelab": ("saelab", ROOT / ".venv", [], "saelab (its defaults: signum, schedule-free)"),
    "saelab-adam": ("saelab", ROOT / ".venv", ["--set", "optimizer=adam"],
                    "saelab --optimizer adam (saelab 0.5's default)"),
    "sparsify": ("sparsify", venv("sparsify"), [], "EleutherAI sparsify 1.3.3 (signum, schedule-free)"),
    "dictlearn": ("dictlearn", venv("dictlearn"), [], "dictionary_learning 0.1.0 (Adam, warm-up) ²"),
    "saelens": ("saelens", venv("saelens"), [], "SAELens 6.54.12 (Adam 3e-4, constant)"),
}
SCHEDULED = {"saelab-adam"}  # LR decay over the run's last 20%


STUDY = [  # what was tried on saelab's signum before its defaults were chosen (2026-12-08, this data)
    "## What chose saelab's defaults (one run each, `run_one.py saelab --set KEY=VALUE`, this data)",
    "",
    "| saelab setting | 90k | 180k | 360k | 720k | 1.44M |",
    "|---|---:|---:|---:|---:|---:|",
    "| signum at sparsify's LR rule, 5e-3/√(n/2¹⁴) = 1e-2 | 0.213 | 0.173 | 0.139 | 0.136 | 0.144 |",
    "| the same, LR decayed over the last 20% | – | – | 0.139 | 0.136 | 0.148 |",
    "| the same, LR 2e-2 | 0.256 | 0.195 | 0.197 | – | – |",
    "| the same, inputs not normalised | 0.175 | 0.146 | 0.139 | – | – |",
    "| the same, no AuxK | 0.213 | 0.173 | 0.139 | – | – |",
    "| **signum at LR 5e-3, half sparsify's rule: the default** | 0.194 | 0.168 | 0.137 | 0.115 | 0.110 |",
    "",
    "The iterate y the gradient is taken at and the average x that is saved differ by under 0.005 FVU "
    "at 22, 44 and 88 steps. Neither input normalisation nor AuxK explains why saelab's signum is "
    "ahead of sparsify's at the same LR (0.139 against 0.379 at 360k). What remains to compare is "
    "the initialisation: saelab starts W_enc = W_decᵀ from unit random rows with b_dec at the "
    "geometric median; sparsify a default-initialised encoder whose normalised rows start the "
    "decoder, with b_dec at the first batch's mean.",
]


def seconds_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at which ``curve`` first reaches FVU ``target`` (linear between the
    measured points), or None if it never does. Reached at the first point: that point's seconds
    (an upper bound; the table marks it ≤)."""
    prev = None
    for p in curve:
        if p["fvu"] <= target:
            if prev is None:
                return float(p["seconds"])
            f = (prev["fvu"] - target) / max(prev["fvu"] - p["fvu"], 1e-12)
            return float(prev["seconds"] + f * (p["seconds"] - prev["seconds"]))
        prev = p
    return None


def median_curve(runs: list[dict]) -> list[dict]:
    """Point by point: the median seconds over the repeats; quality from the first repeat (the
    same rows, order and seed each time: it only differs in float rounding)."""
    out = []
    for i, p in enumerate(runs[0]["curve"]):
        out.append({**p, "seconds": statistics.median(r["curve"][i]["seconds"] for r in runs)})
    return out


def machine() -> str:
    """The CPU and the vector extensions a speed claim depends on."""
    name, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(ext) or 'no AVX2'}), 2 threads"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results["libs"].values():
        c = r["curve"]
        for ax, key in zip(axes, ("tokens", "seconds"), strict=True):
            ax.plot([p[key] for p in c], [p["fvu"] for p in c], marker="o", label=r["name"])
    for ax, label in zip(axes, ("training tokens", "training seconds (2 CPU threads)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out FVU")
        ax.grid(True, which="both", alpha=0.3)
    for t in results["targets"]:
        for ax in axes:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"TopK SAE, d_in {D}, {N_LATENTS} latents, k {K}: each library at its own defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_883_584, help="the largest budget (rows)")
    ap.add_argument("--eval-at", default="90112,180224,360448,720896,1441792",
                    help="the budgets measured before the largest")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--targets", default="0.5,0.3,0.2", help="FVU targets for the time-to table")
    ap.add_argument("--data", type=Path, default=Path("/tmp/saelab-ttq"))
    ap.add_argument("--out", type=Path, default=HERE / "time_to_quality")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other libraries' results from the last run's JSON (re-measure some)")
    ap.add_argument("--report", action="store_true",
                    help="rewrite the table and plot from the JSON of the last run, training nothing")
    a = ap.parse_args()
    if a.report:
        results = json.loads(a.out.with_suffix(".json").read_text())
        for lib, r in results["libs"].items():
            r["name"] = LIBS[lib][3]
            r["time_to"] = {str(t): seconds_to(r["curve"], t) for t in results["targets"]}
        a.repeats, a.tokens = results["repeats"], r["curve"][-1]["tokens"]
        results["machine"] = results.get("cpu") or machine()
        write(results, a)
        return
    libs = [lib for lib in a.libs.split(",") if (LIBS[lib][1] / "bin" / "python").exists()]
    if set(a.libs.split(",")) - set(libs):
        print(f"skipping {sorted(set(a.libs.split(',')) - set(libs))}: no venv (benchmarks/peers/setup.sh)",
              file=sys.stderr)
    a.data.mkdir(parents=True, exist_ok=True)
    train, held, dirs = a.data / "train.npy", a.data / "heldout.npy", a.data / "dirs.npy"
    if not dirs.exists():
        np.save(dirs, feature_dirs(D, FEATURES, seed=0).numpy())
    if not train.exists() or np.load(train, mmap_mode="r").shape[0] < a.tokens:
        make_data(train, a.tokens, d=D, features=FEATURES, seed=10, dirs_seed=0)
    if not held.exists():
        make_data(held, HELD_ROWS, d=D, features=FEATURES, seed=11, dirs_seed=0)
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for r in range(a.repeats):
        for lib in libs if r % 2 == 0 else libs[::-1]:
            name, env, extra, _ = LIBS[lib]
            cmd = [str(env / "bin" / "python"), str(HERE / "run_one.py"), name, "--train", str(train),
                   "--heldout", str(held), "--dirs", str(dirs), "--tokens", str(a.tokens),
                   "--batch", str(BATCH), "--n-latents", str(N_LATENTS), "--k", str(K),
                   "--eval-at", a.eval_at, *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{lib} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[lib].append(res)
            print(f"repeat {r + 1} {lib}: " + ", ".join(
                f"{p['tokens'] / 1e6:.2f}M {p['seconds']:.0f}s FVU {p['fvu']:.3f}" for p in res["curve"]),
                flush=True)
    targets = [float(t) for t in a.targets.split(",")]
    results: dict = {
        "machine": machine(),
        "data": {"d_in": D, "features": FEATURES, "active": 16, "held_out_rows": HELD_ROWS},
        "sae": {"n_latents": N_LATENTS, "k": K, "batch": BATCH}, "repeats": a.repeats,
        "targets": targets, "libs": {},
    }
    if a.merge and a.out.with_suffix(".json").exists():
        before = json.loads(a.out.with_suffix(".json").read_text())
        results["libs"].update({k: v for k, v in before["libs"].items() if k not in libs})
        results["merged"] = sorted(set(before["libs"]) - set(libs))
    for lib, rs in runs.items():
        if rs:
            curve = median_curve(rs)
            results["libs"][lib] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "name": LIBS[lib][3],
                                    "curve": curve, "runs": rs,
                                    "time_to": {str(t): seconds_to(curve, t) for t in targets},
                                    "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs)}
    write(results, a)


def write(results: dict, a: argparse.Namespace) -> None:
    results["libs"] = {k: results["libs"][k] for k in LIBS if k in results["libs"]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, a.out.with_suffix(".png"))
    a.out.with_suffix(".md").write_text(table(results, a) + "\n")
    print(table(results, a))


def table(results: dict, a: argparse.Namespace) -> str:
    libs = results["libs"]
    budgets = [p["tokens"] for p in next(iter(libs.values()))["curve"]] if libs else []
    lines = [
        "# Time to a quality: saelab and its peers at their own defaults",
        "",
        f"`python benchmarks/peers/time_to_quality.py --tokens {a.tokens} --repeats {a.repeats}` on "
        f"{results['machine']}. TopK SAE, d_in {D}, {N_LATENTS:,} latents, k {K}, batch {BATCH}; synthetic "
        f"rows over {FEATURES:,} known directions; held-out FVU, dead fraction and MMCS on "
        f"{HELD_ROWS:,} held-out rows. Seconds are training time only (median of {a.repeats} alternating "
        "repeats); evaluation pauses the clock.",
        "",
        *([f"The rows of {', '.join(results['libs'][k]['name'] for k in results['merged'])} are kept from an "
           "earlier run on the same machine and data (`--merge`); the others were measured again on "
           f"{max(r.get('measured', '') for r in libs.values())}.", ""] if results.get("merged") else []),
        "## Held-out FVU (MMCS) after each budget",
        "",
        "| library | " + " | ".join(f"{b / 1e6:.2f}M" for b in budgets) + " | tokens/s | dead at end | runs |",  # noqa: E501
        "|---|" + "---:|" * (len(budgets) + 3),
    ]
    for lib, r in libs.items():
        cells = [f"{p['fvu']:.3f} ({p.get('mmcs', float('nan')):.2f})" for p in r["curve"]]
        mark = " ¹" if lib in SCHEDULED else ""
        lines.append(f"| {r['name']}{mark} | " + " | ".join(cells) +
                     f" | {r['tokens_per_s']:,.0f} | {100 * r['curve'][-1]['dead_fraction']:.1f}% | "
                     f"{len(r['runs'])} |")
    lines += ["", "## Training seconds to reach each held-out FVU", "",
              "| library | " + " | ".join(f"FVU ≤ {t}" for t in results["targets"]) + " |",
              "|---|" + "---:|" * len(results["targets"])]
    for r in libs.values():
        first = r["curve"][0]
        cells = ["not reached" if s is None else
                 f"≤ {s:.0f} s" if first["fvu"] <= float(t) else f"{s:.0f} s"
                 for t, s in r["time_to"].items()]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "¹ its LR decays over the last 20% of the run: the points before the end are "
              "without that decay (see the script's docstring).",
              "² its TopKTrainer refuses a run of no more steps than its 1,000 warm-up steps (4.1M tokens "
              "at batch 4096); run_one.py warms it up over the first 10% of such a run instead, the one "
              "change from a peer's defaults here. A run that fails is left out of the medians.",
              "≤: already reached at the first measurement.", "", *STUDY, "",
              "![FVU against tokens and seconds](time_to_quality.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
