"""Training-step speed per attention backend, side by side in one run, with the time spent waiting for data.

On CUDA it runs train.py's reference default config (DEPTH 8, context 2048, 2^19 tokens per step) for each
backend that loads (fa3, flex); on a CPU it runs a tiny config with sdpa so the script itself stays tested.
Prints a table and writes it as JSON (device, torch version, date) to bench/results/gpu-<device name>.json.
Needs a prepared dataset. Run: uv run bench/gpu.py [--steps 20] [--warmup 5]
"""
import argparse
import datetime
import json
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prepare
import train

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_cpu_config():
    """Small enough for a few steps a second on 2 cores: the point on CPU is that the script runs."""
    train.DEPTH, train.ASPECT_RATIO, train.HEAD_DIM = 2, 64, 64
    train.TOTAL_BATCH_SIZE, train.DEVICE_BATCH_SIZE = 8 * prepare.MAX_SEQ_LEN, 4


def backends(device):
    if device != "cuda":
        return ["sdpa"]
    found = ["flex"]
    train.FA3, why = train.load_fa3()
    if train.FA3 is not None:
        found.insert(0, "fa3")
    else:
        print(f"fa3 skipped: {why}")
    return found


def measure(backend, device, dtype, tokenizer, steps, warmup):
    """Mean step time over `steps` timed steps after `warmup` (compilation) steps, and the share of it spent
    in next(loader)."""
    torch.manual_seed(0)
    config = train.model_config(train.DEPTH, tokenizer.get_vocab_size(), backend)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype)
    compile_model = device == "cuda"
    optimizer = model.setup_optimizer(orth_dtype=dtype, compile=compile_model)
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    accum = train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN)
    loader = prepare.make_dataloader(tokenizer, train.DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN, "train", device)
    x, y, _ = next(loader)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    timed, waited = 0.0, 0.0
    for step in range(warmup + steps):
        train.synchronize(device)
        t0 = time.perf_counter()
        wait = 0.0
        for _ in range(accum):
            with autocast:
                loss = step_model(x, y)
            (loss / accum).backward()
            tw = time.perf_counter()
            x, y, _ = next(loader)
            wait += time.perf_counter() - tw
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train.synchronize(device)
        if step == warmup - 1:
            startup = time.perf_counter() - t_start
        if step >= warmup:
            timed += time.perf_counter() - t0
            waited += wait
    dt = timed / steps
    tokens_per_second = train.TOTAL_BATCH_SIZE / dt
    peak = train.peak_flops(device)
    return dict(backend=backend, ms_per_step=1000 * dt, tokens_per_second=tokens_per_second,
                mfu_percent=100 * model.num_flops_per_token() * tokens_per_second / peak if peak else None,
                peak_memory_mb=train.peak_memory_mb(device), loader_wait_percent=100 * waited / timed,
                startup_seconds=startup, final_loss=loss.item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    args = parser.parse_args()
    device, device_name = train.pick_device()
    dtype, why = train.pick_dtype(device)
    if device != "cuda":
        tiny_cpu_config()
    tokenizer = prepare.Tokenizer.from_directory()
    print(f"device: {device_name}; {why}; torch {torch.__version__}; dataset {prepare.dataset_label()}")
    print(f"config: depth {train.DEPTH}, aspect {train.ASPECT_RATIO}, head dim {train.HEAD_DIM}, context "
          f"{prepare.MAX_SEQ_LEN}, {train.TOTAL_BATCH_SIZE:,} tokens/step in batches of {train.DEVICE_BATCH_SIZE}")
    rows = [measure(b, device, dtype, tokenizer, args.steps, args.warmup) for b in backends(device)]
    print(f"{'backend':<8} {'ms/step':>9} {'tokens/s':>11} {'MFU %':>6} {'peak MB':>9} {'loader wait %':>14} "
          f"{'start-up s':>11}")
    for r in rows:
        mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "n/a"
        print(f"{r['backend']:<8} {r['ms_per_step']:>9.1f} {r['tokens_per_second']:>11,.0f} {mfu:>6} "
              f"{r['peak_memory_mb']:>9.0f} {r['loader_wait_percent']:>14.2f} {r['startup_seconds']:>11.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-')}.json"
    out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__, precision=why,
                                   date=datetime.date.today().isoformat(), steps=args.steps, warmup=args.warmup,
                                   config=dict(depth=train.DEPTH, aspect_ratio=train.ASPECT_RATIO,
                                               head_dim=train.HEAD_DIM, context=prepare.MAX_SEQ_LEN,
                                               total_batch_size=train.TOTAL_BATCH_SIZE,
                                               device_batch_size=train.DEVICE_BATCH_SIZE),
                                   rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
