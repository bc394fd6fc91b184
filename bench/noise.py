"""Run-to-run noise of val_bpb on this machine: runs of the unchanged train.py (or one with --edit), each the
full budget, grouped, with mean, standard deviation, spread and step counts per group.

    uv run bench/noise.py                     # 3 runs with SEED 42, then 3 with SEEDs 43-45 (~40 min on 2 cores)
    uv run bench/noise.py --repeats 2 --seeds 4
    uv run bench/noise.py --load --budget 60  # SEED 42 alone, then beside a busy process: what load does
    uv run bench/noise.py --edit TOTAL_BATCH_SIZE=2**13 --label batch13

Needs a prepared dataset. Writes bench/results/noise-<device>[-load][-<label>].json after every run, so an interrupted
measurement keeps the runs that finished; each run's whole output goes to --logs.
"""
import argparse
import datetime
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import prepare
import runtime

RESULTS = Path(__file__).resolve().parent / "results"


def plan(args):
    """(group, seed, busy) for every run, in the order they run."""
    if args.load:  # alternate, so a drift of the machine over time hits both groups alike
        return [(group, 42, busy) for _ in range(args.repeats) for group, busy in (("alone", False), ("busy", True))]
    return ([("same seed", 42, False)] * args.repeats
            + [("different seeds", 43 + i, False) for i in range(args.seeds)])


def stats(rows):
    bpbs = [r["val_bpb"] for r in rows]
    steps = [r["num_steps"] for r in rows]
    return dict(runs=len(rows), mean=statistics.mean(bpbs), std=statistics.stdev(bpbs) if len(bpbs) > 1 else None,
                spread=max(bpbs) - min(bpbs), steps_min=min(steps), steps_max=max(steps))


def step_fit(rows):
    """val_bpb against the step count over all runs (least squares): what one more step is worth, and the spread
    left at a fixed step count, i.e. the noise a budget counted in steps would leave. None below 3 runs."""
    steps, bpbs = [r["num_steps"] for r in rows], [r["val_bpb"] for r in rows]
    if len(rows) < 3 or len(set(steps)) < 2:
        return None
    per_step, intercept = statistics.linear_regression(steps, bpbs)
    residuals = [b - intercept - per_step * n for n, b in zip(steps, bpbs)]
    return dict(per_step=per_step, std_at_fixed_steps=math.sqrt(sum(r * r for r in residuals) / (len(rows) - 2)))


def run_one(seed, busy, args, log):
    """One full run; with busy, a process spinning on one core runs beside it for the whole run."""
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        summary, output, wall = harness.run_train({**args.edits, "SEED": seed}, log=log, timeout=args.budget * 6 + 600,
                                                  env={"AUTORESEARCH_TIME_BUDGET": str(args.budget)})
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    if "val_bpb" not in summary:
        raise SystemExit(f"run with SEED {seed} crashed; its output is in {log}:\n{output[-2000:]}")
    precision = re.search(r"^precision: (.*)$", output, re.M)
    overhead = re.search(r"compilation included\): ([\d.]+)s, evaluation: ([\d.]+)s", output)
    return dict(seed=seed, busy=busy, val_bpb=float(summary["val_bpb"]), num_steps=int(summary["num_steps"]),
                training_seconds=float(summary["training_seconds"]), wall_seconds=round(wall, 1),
                startup_seconds=float(overhead.group(1)), eval_seconds=float(overhead.group(2)),
                precision=precision.group(1) if precision else None, summary=summary)


def report(rows, header):
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    table = {g: stats(rs) for g, rs in groups.items()}
    print(header)
    print(f"{'group':<16} {'runs':>4} {'mean':>9} {'std':>9} {'spread':>8} {'steps':>11}  val_bpb")
    for g, s in table.items():
        std = f"{s['std']:.4f}" if s["std"] is not None else "-"
        values = ", ".join(f"{r['val_bpb']:.4f}" for r in groups[g])
        print(f"{g:<16} {s['runs']:>4} {s['mean']:>9.4f} {std:>9} {s['spread']:>8.4f} "
              f"{s['steps_min']:>5}-{s['steps_max']:<5}  {values}")
    fit = step_fit(rows)
    if fit:
        print(f"all runs: {fit['per_step']:+.4f} val_bpb per step; std at a fixed step count "
              f"{fit['std_at_fixed_steps']:.4f}")
    return table, fit


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs with SEED 42 (with --load: pairs)")
    parser.add_argument("--seeds", type=int, default=3, help="runs with SEEDs 43, 44, ...")
    parser.add_argument("--budget", type=float, default=300, help="training seconds per run")
    parser.add_argument("--load", action="store_true", help="SEED 42 alone and beside a busy process, alternating")
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=VALUE", help="a constant of train.py")
    parser.add_argument("--label", default="", help="added to the output file name")
    parser.add_argument("--out", help="JSON file to write (default bench/results/noise-<device>[-load][-<label>].json)")
    parser.add_argument("--logs", default="/tmp/noise-logs", help="folder for each run's output")
    args = parser.parse_args()
    if args.repeats < 1 or args.seeds < 0 or args.budget <= 0:
        parser.error("--repeats must be at least 1, --seeds at least 0 and --budget positive")
    if args.label and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.label):
        parser.error("--label: letters, digits, '.', '_' and '-' only")
    args.edits = harness.parse_edits(args.edit)
    try:  # a misspelt name fails now, not after an hour
        harness.edit_constants((harness.REPO / "train.py").read_text(), args.edits)
    except ValueError as e:
        parser.error(str(e))

    device, machine = runtime.pick_device()
    load = "-load" if args.load else ""  # a load test never overwrites a noise measurement
    name = harness.slug(machine) + load + (f"-{args.label}" if args.label else "")
    out = Path(args.out) if args.out else RESULTS / f"noise-{name}.json"
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    todo = plan(args)
    header = (f"{machine}; {'load test' if args.load else 'noise'}; budget {args.budget:g}s; "
              f"edits {args.edits or 'none'}")
    print(header, flush=True)
    rows = []
    for i, (group, seed, busy) in enumerate(todo, 1):
        log = Path(args.logs) / f"{name}-{i:02d}-seed{seed}{'-busy' if busy else ''}.log"
        print(f"[{datetime.datetime.now():%H:%M:%S}] run {i}/{len(todo)}: {group}, SEED {seed} (log {log})",
              flush=True)
        row = dict(group=group, **run_one(seed, busy, args, log))
        rows.append(row)
        print(f"    val_bpb {row['val_bpb']:.6f}, {row['num_steps']} steps, {row['wall_seconds']:.0f}s wall",
              flush=True)
        table, fit = report(rows, header) if i == len(todo) else ({}, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        prepare.write_json(out, dict(machine=machine, device=device, date=datetime.date.today().isoformat(),
                                  budget=args.budget, load=args.load, edits=args.edits, groups=table,
                                  step_fit=fit, runs=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
