"""Harvest and store figures on a real model.

    python benchmarks/harvest_store.py --store runs/smol-l6 [--tokens 60000]

1. Harvest speed: saelab's harvest (tokenise, forward to the hook, drop BOS, convert to
   fp16, write shards with sha256 and manifest) against a bare forward pass through the
   same blocks (the model truncated after the hook's block, no hooks, nothing kept), on the
   same windows. Runs alternate; medians. Overhead = 1 − harvest rate / bare rate, both
   counted in token positions processed.
2. Store read: rows/s of the shuffling reader (fp16 shards → shuffled float32 batches of
   4096), first pass with sha256 verification and a second without, against the training
   rate of the TopK SAE the README reports, to show whether training is input-bound.
3. Peak RSS (fresh subprocesses): a full epoch of the shuffling reader over the store with
   a 131,072-row buffer (the store is many times larger than the buffer); harvests of two
   sizes; training from the store.

Results are printed and written to benchmarks/harvest_store.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def rss_of(code: str) -> tuple[float, dict[str, float]]:
    """Peak RSS (MiB) of a fresh Python running ``code``, and its RssAnon / RssFile at the end
    (MiB): file pages are memory-mapped shards resident in the page cache, reclaimable."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by this
    # (large) process would report the parent's peak.
    wrapper = code + ("\nfrom pathlib import Path\n"
                      "st = {l.split(':')[0]: int(l.split()[1]) for l in Path('/proc/self/status')"
                      ".read_text().splitlines() if l.startswith(('VmHWM', 'RssAnon', 'RssFile'))}\n"
                      "print('RSS', st['VmHWM'], st['RssAnon'], st['RssFile'])\n")
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True).stdout
    _, hwm, anon, file = out.strip().splitlines()[-1].split()
    return int(hwm) / 1024, {"anon_end_mib": int(anon) / 1024, "file_end_mib": int(file) / 1024}


def harvest_speed(tokens: int, repeats: int) -> dict:
    from saelab.activations.harvest import first_tokens, harvest
    from saelab.config import HarvestConfig
    from saelab.data.text import text_batches
    from saelab.models import open_model

    lm = open_model("smollm2-135m", "cpu")
    hook, block = "blocks.6.hook_resid_post", 6
    cfg = HarvestConfig(model="smollm2-135m", hooks=[hook], tokens=tokens, context_length=256,
                        batch_size=16, dtype="float16", progress=False)
    batches = first_tokens(text_batches(lm, cfg, "train"), tokens)
    n = sum(b.n_content for b in batches)
    positions_per_row = sum(int(b.attention_mask.sum()) for b in batches) / n

    inner = lm.model.model
    full_layers = inner.layers

    def bare() -> float:
        inner.layers = full_layers[:block + 1]
        try:
            t = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    inner(input_ids=b.input_ids, attention_mask=b.attention_mask)
            return sum(int(b.attention_mask.sum()) for b in batches) / (time.perf_counter() - t)
        finally:
            inner.layers = full_layers

    def ours() -> float:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            harvest(cfg, Path(d) / "s", lm=lm)
            return tokens * positions_per_row / (time.perf_counter() - t)

    bare(), ours()  # warm up
    rates: dict[str, list[float]] = {"bare": [], "harvest": []}
    for _ in range(repeats):
        rates["bare"].append(bare())
        rates["harvest"].append(ours())
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens": tokens, "context_length": 256, "batch_windows": 16, "hook": hook,
            "bare_forward_tok_s": med["bare"], "harvest_tok_s": med["harvest"],
            "harvest_rows_s": med["harvest"] / positions_per_row,
            "overhead": 1 - med["harvest"] / med["bare"], "runs": rates}


def read_speed(store_path: Path, batch: int = 4096, batches: int = 300) -> dict:
    from saelab.activations.store import ActivationStore

    out = {}
    for label, verify in (("verify_sha256", True), ("no_verify", False)):
        store = ActivationStore(store_path, verify=verify)
        it = store.batches(batch, seed=0)
        next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        out[label] = batch * batches / (time.perf_counter() - t)
    out["rows"] = store.n_rows
    out["buffer_rows"] = store.buffer_rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("runs/smol-l6"))
    ap.add_argument("--tokens", type=int, default=60_000, help="tokens per harvest timing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-rate", type=float, default=None,
                    help="tokens/s of the README's TopK training run, for the input-bound check")
    ap.add_argument("--rss-only", action="store_true",
                    help="re-measure only peak RSS; keep the speed figures of the last harvest_store.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = platform.processor() or platform.machine()
    res: dict = {"machine": f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__}
    if args.rss_only:
        old = json.loads((HERE / "harvest_store.json").read_text())
        res["harvest"], res["read"] = old["harvest"], old["read"]
    else:
        print("harvest speed ...", file=sys.stderr)
        res["harvest"] = harvest_speed(args.tokens, args.repeats)
        print("store read speed ...", file=sys.stderr)
        res["read"] = read_speed(args.store)
    if args.train_rate:
        res["read"]["train_tok_s"] = args.train_rate
        res["read"]["reader_over_trainer"] = res["read"]["no_verify"] / args.train_rate

    print("peak RSS ...", file=sys.stderr)
    epoch = f"""
from saelab.activations.store import ActivationStore
s = ActivationStore({str(args.store)!r}, buffer_rows=131072, verify=False)
n = 0
for b in s.batches(4096, seed=0):
    n += b.shape[0]
    if n >= s.n_rows:
        break
print(n, s.n_rows, s.path.stat().st_size)
"""
    rss_epoch, split = rss_of(epoch)
    baseline, _ = rss_of("import torch, numpy, saelab.activations.store")
    store_bytes = sum(p.stat().st_size for p in args.store.glob("shard_*.npy"))
    res["rss"] = {"python_torch_baseline_mib": baseline, "reader_full_epoch_mib": rss_epoch,
                  "reader_full_epoch_end": split,
                  "reader_buffer_rows": 131072, "reader_buffer_mib_fp32": 131072 * 576 * 4 / 2**20,
                  "store_mib": store_bytes / 2**20, "store_rows": res["read"]["rows"]}
    for n in (200_000, 800_000):
        code = f"""
import tempfile
from pathlib import Path
from saelab.activations.harvest import harvest
from saelab.config import HarvestConfig
with tempfile.TemporaryDirectory() as d:
    harvest(HarvestConfig(model="smollm2-135m", hooks=["blocks.6.hook_resid_post"], tokens={n},
                          progress=False), Path(d) / "s")
"""
        res["rss"][f"harvest_{n}_tokens_mib"] = rss_of(code)[0]
    train = f"""
import tempfile
from saelab.activations.store import ActivationStore
from saelab.train.config import TrainConfig
from saelab.train.trainer import Trainer
s = ActivationStore({str(args.store)!r}, verify=False)
with tempfile.TemporaryDirectory() as d:
    Trainer(s, TrainConfig(architecture="topk", expansion_factor=16, k=32, tokens=4096 * 60,
                           progress=False), d).run()
"""
    res["rss"]["train_topk_16x_mib"] = rss_of(train)[0]

    (HERE / "harvest_store.json").write_text(json.dumps(res, indent=2) + "\n")
    h, r, m = res["harvest"], res["read"], res["rss"]
    md = f"""# Harvest and store benchmark

`python benchmarks/harvest_store.py --store {args.store}` on {res['machine']}, torch {res['torch']}.

## Harvest: SmolLM2-135M, `{h['hook']}`, {h['batch_windows']} windows x {h['context_length']} tokens

| | token positions/s (median of {args.repeats}) |
|---|---|
| bare forward through blocks 0-6 (no hooks, nothing kept) | {h['bare_forward_tok_s']:,.0f} |
| `saelab harvest` (tokenise, hook, drop BOS, fp16, shards + sha256 + manifest) | {h['harvest_tok_s']:,.0f} |
| **overhead** | **{100 * h['overhead']:.1f}%** |

## Store read: shuffling reader, batches of 4096 float32 rows

| | rows/s |
|---|---|
| first pass, each shard's sha256 checked | {r['verify_sha256']:,.0f} |
| checksums already checked | {r['no_verify']:,.0f} |
"""
    if "train_tok_s" in r:
        md += (f"| TopK 16x training on this store (fastest README run, rows/s consumed) | "
               f"{r['train_tok_s']:,.0f} |\n\n"
               f"The reader is {r['reader_over_trainer']:.0f}x faster than training consumes rows, and it "
               "prefetches the next buffer on a thread, so training is not input-bound.\n")
    md += f"""
## Peak RSS (fresh processes)

| process | peak RSS |
|---|---|
| python + torch + saelab imported | {m['python_torch_baseline_mib']:,.0f} MiB |
| one full epoch of the reader over the {m['store_rows']:,}-row store \
({m['store_mib']:,.0f} MiB on disk), buffer {m['reader_buffer_rows']:,} rows \
({m['reader_buffer_mib_fp32']:,.0f} MiB float32) | {m['reader_full_epoch_mib']:,.0f} MiB |
| harvest of 200,000 tokens (3 shards) | {m['harvest_200000_tokens_mib']:,.0f} MiB |
| harvest of 800,000 tokens (13 shards) | {m['harvest_800000_tokens_mib']:,.0f} MiB |
| TopK 16x training from the store | {m['train_topk_16x_mib']:,.0f} MiB |

The reader's memory is set by its buffer (two buffers: the one in use and the one being
prefetched), not by the store, which is \
{m['store_mib'] / m['reader_buffer_mib_fp32']:.0f}x the buffer's size. \
At the end of the epoch {m['reader_full_epoch_end']['file_end_mib']:,.0f} MiB of the reader's RSS are \
pages of the memory-mapped shards (page cache the kernel reclaims under pressure) and \
{m['reader_full_epoch_end']['anon_end_mib']:,.0f} MiB its own memory. Harvest memory is the model, \
one batch and one shard being written; peaks differ by the spike of a shard write \
({m['harvest_200000_tokens_mib']:,.0f} MiB for 200k tokens, \
{m['harvest_800000_tokens_mib']:,.0f} MiB for 800k).
"""
    (HERE / "harvest_store.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
