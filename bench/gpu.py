"""Training-step speed per attention backend, side by side in one run, with the time spent waiting for data.

On CUDA it runs train.py's reference default config (DEPTH 8, context 2048, 2^19 tokens per step) for each
backend asked for; the micro-batch is fitted to memory as train.py fits it, and --memory-gb simulates smaller cards
(24,40: one row per card size, each capped with set_per_process_memory_fraction). On a CPU it runs a tiny config
with sdpa so the script itself stays tested. Prints a table and writes it as JSON (device, torch version, date) to
bench/results/gpu-<device name>.json, or --out.
Needs a prepared dataset. Run: uv run bench/gpu.py [--steps 20] [--warmup 5] [--backends fa3,flex]
"""
import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import prepare
import runtime
import train

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_cpu_config():
    """Small enough for a few steps a second on 2 cores: the point on CPU is that the script runs."""
    train.DEPTH, train.ASPECT_RATIO, train.HEAD_DIM = 2, 64, 64
    train.TOTAL_BATCH_SIZE, train.DEVICE_BATCH_SIZE = 8 * prepare.MAX_SEQ_LEN, 4


def backends(device, asked):
    """[(backend, its loaded FA3 module or None)] of those asked that load here."""
    if device != "cuda":
        return [("sdpa", None)]
    found = []
    for backend in asked:
        fa3 = None
        if backend == "fa3":
            fa3, why = runtime.load_fa3()
            if fa3 is None:
                print(f"fa3 skipped: {why}")
                continue
        found.append((backend, fa3))
    return found


def measure(backend, fa3, device, dtype, tokenizer, steps, warmup, memory_gb=None):
    """Mean step time over `steps` timed steps after `warmup` (compilation) steps, the share of it spent in
    next(loader), and the graphs compiled after warm-up (recompilations)."""
    if memory_gb:  # a smaller card: this process may take only memory_gb of the GPU
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gb * 2**30 / torch.cuda.mem_get_info()[1]))
    torch.manual_seed(0)
    compile_model = device == "cuda"
    rt = runtime.Runtime(prepare.dataset_label(), device, dtype, backend, compile_model, compile_model,
                         runtime.peak_flops(device), fa3)
    config = train.model_config(tokenizer.get_vocab_size())
    model = rt.build_model(train.GPT, config, train.layer_windows(config))
    optimizer = model.setup_optimizer(dtype=dtype, compile=compile_model)
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    autocast = rt.autocast()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    rows, accum = runtime.fit_micro_batch(rt, step_model, model, train.DEVICE_BATCH_SIZE, train.TOTAL_BATCH_SIZE)
    loader = prepare.make_dataloader(tokenizer, rows, prepare.MAX_SEQ_LEN, "train", device)
    x, y, _ = next(loader)
    timed, waited = 0.0, 0.0
    for step in range(warmup + steps):
        runtime.synchronize(device)
        t0 = time.perf_counter()
        wait = 0.0
        for _ in range(accum):
            with autocast:
                loss = step_model(x, y)
            (loss / accum).backward()
            tw = time.perf_counter()
            x, y, _ = next(loader)
            wait += time.perf_counter() - tw
        train.update_schedules(optimizer, step, step / (warmup + steps))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        runtime.synchronize(device)
        if step == warmup - 1:
            startup, graphs = time.perf_counter() - t_start, counters["stats"]["unique_graphs"]
        if step >= warmup:
            timed += time.perf_counter() - t0
            waited += wait
    if memory_gb:
        torch.cuda.set_per_process_memory_fraction(1.0)
    dt = timed / steps
    tokens_per_second = train.TOTAL_BATCH_SIZE / dt
    peak = rt.peak_flops
    return dict(backend=backend, memory_gb=memory_gb, micro_batch=rows, ms_per_step=1000 * dt,
                tokens_per_second=tokens_per_second,
                mfu_percent=100 * model.num_flops_per_token() * tokens_per_second / peak if peak else None,
                peak_memory_mb=runtime.peak_memory_mb(device), loader_wait_percent=100 * waited / timed,
                startup_seconds=startup, recompiles=counters["stats"]["unique_graphs"] - graphs,
                final_loss=loss.item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=harness.at_least(1), default=20, help="timed steps per backend")
    parser.add_argument("--warmup", type=harness.at_least(1), default=5, help="untimed steps first (compilation)")
    parser.add_argument("--backends", default="fa3,flex", help="CUDA: comma-separated, of fa3, flex, sdpa")
    parser.add_argument("--memory-gb", default="", help="CUDA: simulated card sizes in GB, e.g. 24,40")
    parser.add_argument("--out", help="JSON file to write (default bench/results/gpu-<device>.json)")
    args = parser.parse_args()
    asked = [b for b in args.backends.split(",") if b]
    if not asked or set(asked) - set(runtime.ATTENTION_BACKENDS):
        parser.error(f"--backends {args.backends!r}: choose from {', '.join(runtime.ATTENTION_BACKENDS)}")
    try:
        sizes = [float(g) for g in args.memory_gb.split(",") if g]
    except ValueError:
        parser.error(f"--memory-gb {args.memory_gb!r}: give sizes in GB, e.g. 24,40")
    device, device_name = runtime.pick_device()
    dtype, why = runtime.pick_dtype(device)
    if device != "cuda":
        tiny_cpu_config()
        if sizes:
            print("--memory-gb needs CUDA: the CPU run measures the full micro-batch only")
            sizes = []
    tokenizer = prepare.Tokenizer.from_directory()
    print(f"device: {device_name}; {why}; torch {torch.__version__}; dataset {prepare.dataset_label()}")
    print(f"config: depth {train.DEPTH}, aspect {train.ASPECT_RATIO}, head dim {train.HEAD_DIM}, context "
          f"{prepare.MAX_SEQ_LEN}, {train.TOTAL_BATCH_SIZE:,} tokens/step, micro-batch at most "
          f"{train.DEVICE_BATCH_SIZE}")
    found = backends(device, asked)
    rows = [measure(b, fa3, device, dtype, tokenizer, args.steps, args.warmup) for b, fa3 in found]
    rows += [measure(*(found[0] if found else ("flex", None)), device, dtype, tokenizer, args.steps, args.warmup, gb)
             for gb in sizes]
    print(f"{'backend':<8} {'card GB':>7} {'rows':>5} {'ms/step':>9} {'tokens/s':>11} {'MFU %':>6} {'peak MB':>9} "
          f"{'loader wait %':>14} {'start-up s':>11} {'recompiles':>10}")
    for r in rows:
        mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "n/a"
        peak_mb = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "n/a"  # MPS keeps no peak
        print(f"{r['backend']:<8} {r['memory_gb'] or '-':>7} {r['micro_batch']:>5} {r['ms_per_step']:>9.1f} "
              f"{r['tokens_per_second']:>11,.0f} {mfu:>6} {peak_mb:>9} "
              f"{r['loader_wait_percent']:>14.2f} {r['startup_seconds']:>11.1f} {r['recompiles']:>10}")
    out = Path(args.out) if args.out else RESULTS / f"gpu-{harness.slug(device_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare.write_json(out, dict(device=device_name, torch=torch.__version__, precision=why,
                                 date=datetime.date.today().isoformat(), steps=args.steps, warmup=args.warmup,
                                 config=dict(depth=train.DEPTH, aspect_ratio=train.ASPECT_RATIO,
                                             head_dim=train.HEAD_DIM, context=prepare.MAX_SEQ_LEN,
                                             total_batch_size=train.TOTAL_BATCH_SIZE,
                                             device_batch_size=train.DEVICE_BATCH_SIZE),
                                 rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
