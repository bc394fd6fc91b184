"""Dataloader throughput on this machine, side by side in one run.

Compares the packing loader (documents tokenized once at prepare time) with what tokenizing on the fly
would cost, as in the reference. Needs a prepared dataset (e.g. `uv run prepare.py --dataset stdlib`).
Prints a table and writes it as JSON to bench/results/loader-<machine>.json, or --out.
Run: uv run bench/loader.py [--seconds 5]
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import prepare
import runtime

RESULTS = Path(__file__).resolve().parent / "results"


def loader_rate(tokenizer, B, T, seconds):
    loader = prepare.make_dataloader(tokenizer, B, T, "train")
    next(loader)
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _, _ = next(loader)
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def tokenize_rate(tokenizer, seconds):
    """Tokens/s of tiktoken's threaded batch encoder over the training text: the on-the-fly alternative."""
    name = prepare.active_dataset()
    shard = prepare.dataset_dir(name) / "shards" / prepare.read_meta(name)["train"][0]
    texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
    tokens, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        batch = texts[i:i + 128] or texts[:128]
        i = i + 128 if i + 128 < len(texts) else 0
        tokens += sum(map(len, tokenizer.encode(batch, num_threads=os.cpu_count())))
    return tokens / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=harness.at_least(0.1, float), default=5.0, help="measuring time of each row")
    parser.add_argument("--out", help="JSON file to write (default bench/results/loader-<machine>.json)")
    args = parser.parse_args()
    tokenizer = prepare.Tokenizer.from_directory()
    machine = f"{runtime.cpu_name()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; dataset {prepare.dataset_label()}")
    rows = [dict(what=f"packing loader, B={B} T={T}", tokens_per_second=loader_rate(tokenizer, B, T, args.seconds))
            for B, T in [(128, 2048), (32, 256)]]
    rows.append(dict(what="tokenizing on the fly (tiktoken, all cores)",
                     tokens_per_second=tokenize_rate(tokenizer, args.seconds)))
    print(f"{'what':<44} {'M tokens/s':>10}")
    for r in rows:
        print(f"{r['what']:<44} {r['tokens_per_second'] / 1e6:>10.2f}")
    print("target: >= 2M tokens/s (one H100 consumes about 1.7M tokens/s at the reference config)")
    out = Path(args.out) if args.out else RESULTS / f"loader-{harness.slug(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare.write_json(out, dict(machine=machine, dataset=prepare.dataset_label(), seconds=args.seconds,
                                 date=datetime.date.today().isoformat(), rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
