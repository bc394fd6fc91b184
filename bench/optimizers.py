"""The matrix optimizers of train.py side by side on a small looped transformer: final loss and time per step,
each against AdamW, in one invocation.

Model: one shared block applied twice (N_LOOPS = 2, with train.py's zero-initialised loop gates), width 128,
2 heads, context MAX_SEQ_LEN, 16 rows per step. Every optimizer starts from the same weights, sees the same
batches for the same number of steps and runs train.py's schedules (constant lr, then a linear warmdown over the
last half; momentum ramp; weight decay to 0). Final loss: mean cross-entropy on 64 fixed validation rows.
Time/step: mean over the steps after the first 5 (compilation), the optimizer step included.
Needs a prepared dataset. Run: uv run bench/optimizers.py [--steps 300] [--sweep]
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import prepare
import runtime
import train

# Matrix lr per optimizer: the best of a sweep in factors of 2 at 300 steps, each an interior optimum (the sweep
# is in bench/results/optimizers-cpu.md; `--sweep` tries 0.5x, 1x and 2x of these again)
LRS = {"adamw": 0.016, "normuon": 0.08, "muon": 0.08, "adamuon": 0.04, "mano": 0.01, "newton_muon": 0.08}
WIDTH, ROWS, WARMUP_STEPS, VAL_ROWS = 128, 16, 5, 64


def run(rule, lr, steps, tokenizer, device, dtype, val):
    train.MATRIX_OPTIMIZER, train.MATRIX_LR = rule, lr
    config = train.GPTConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=1,
                             n_head=WIDTH // 64, n_kv_head=WIDTH // 64, n_embd=WIDTH, window_pattern="L", n_loops=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = train.LoopedGPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype)
    optimizer = model.setup_optimizer(dtype=dtype)
    step_model = torch.compile(model, dynamic=False) if runtime.pick_compile(device)[0] else model
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    loader = prepare.make_dataloader(tokenizer, ROWS, prepare.MAX_SEQ_LEN, "train", device)
    seconds = 0.0
    for step in range(steps):
        x, y, _ = next(loader)
        t0 = time.perf_counter()
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        train.update_schedules(optimizer, step, step / steps)
        if rule == "newton_muon" and (step + 1) % train.NEWTON_REFRESH_STEPS == 0:
            with autocast:
                train.refresh_newton_muon(optimizer, train.input_second_moments(model, x))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        runtime.synchronize(device)
        if step >= WARMUP_STEPS:
            seconds += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            return dict(rule=rule, lr=lr, loss=math.nan, ms_per_step=math.nan)
    with torch.no_grad(), autocast:
        val_loss = sum(step_model(x.to(device), y.to(device)).item() for x, y in val) / len(val)
    return dict(rule=rule, lr=lr, loss=val_loss, ms_per_step=1000 * seconds / (steps - WARMUP_STEPS))


def print_table(rows):
    adamw = next(r for r in rows if r["rule"] == "adamw")
    print("| Optimizer | lr | Final loss | vs AdamW | Time/step | vs AdamW |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['lr']:g} | {r['loss']:.4f} | {r['loss'] - adamw['loss']:+.4f} | "
              f"{r['ms_per_step']:.1f} ms | {r['ms_per_step'] / adamw['ms_per_step']:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=harness.at_least(WARMUP_STEPS + 1), default=300,
                        help=f"optimizer steps per run, more than {WARMUP_STEPS} (the table and the lrs: 300)")
    parser.add_argument("--sweep", action="store_true", help="also try 0.5x and 2x every lr; print each rule's runs")
    args = parser.parse_args()
    device, device_name = runtime.pick_device()
    dtype, why = runtime.pick_dtype(device)
    tokenizer = prepare.Tokenizer.from_directory()
    rows = torch.from_numpy(prepare.eval_rows(tokenizer)[:VAL_ROWS])
    val = [(rows[i:i + ROWS, :-1], rows[i:i + ROWS, 1:]) for i in range(0, len(rows), ROWS)]
    print(f"device: {device_name}; {why}; torch {torch.__version__}; dataset {prepare.dataset_label()}; "
          f"{args.steps} steps of {ROWS} x {prepare.MAX_SEQ_LEN} tokens; one block of width {WIDTH}, looped twice")
    results = []
    for rule, lr in LRS.items():
        tried = [run(rule, lr * f, args.steps, tokenizer, device, dtype, val) for f in ((0.5, 1, 2) if args.sweep else (1,))]
        for r in tried:
            print(f"{rule:<12} lr {r['lr']:<8g} loss {r['loss']:.4f}  {r['ms_per_step']:.1f} ms/step", flush=True)
        results.append(min(tried, key=lambda r: r["loss"] if math.isfinite(r["loss"]) else math.inf))
    print()
    print_table(results)


if __name__ == "__main__":
    main()
