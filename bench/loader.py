"""Dataloader throughput on this machine, side by side in one run.

Compares the packing loader (documents tokenized once at prepare time) with what tokenizing on the fly
would cost, as in the reference. Needs a prepared dataset (e.g. `uv run prepare.py --dataset stdlib`).
Run: uv run bench/loader.py [--seconds 5]
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prepare


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    shard = prepare.dataset_dir(prepare.active_dataset()) / "shards" / prepare.read_meta(prepare.active_dataset())["train"][0]
    texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
    tokens, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        batch = texts[i:i + 128] or texts[:128]
        i = i + 128 if i + 128 < len(texts) else 0
        tokens += sum(map(len, tokenizer.encode(batch, num_threads=os.cpu_count())))
    return tokens / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    tokenizer = prepare.Tokenizer.from_directory()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; dataset {prepare.active_dataset()}")
    print(f"{'what':<44} {'M tokens/s':>10}")
    for B, T in [(128, 2048), (32, 256)]:
        print(f"{f'packing loader, B={B} T={T}':<44} {loader_rate(tokenizer, B, T, args.seconds) / 1e6:>10.2f}")
    print(f"{'tokenizing on the fly (tiktoken, all cores)':<44} {tokenize_rate(tokenizer, args.seconds) / 1e6:>10.2f}")
    print("target: >= 2M tokens/s (one H100 consumes about 1.7M tokens/s at the reference config)")


if __name__ == "__main__":
    main()
