"""The sweep that chose the CPU profiles' defaults: candidate edits of train.py's size, batch and window
constants, each a full run on this machine, side by side in one invocation, ranked by val_bpb.

    uv run bench/cpu_defaults.py                        # this machine's profile's candidates, 300 s, SEED 42
    uv run bench/cpu_defaults.py --seeds 42,43 --only L-b13,L-w192-b13
    uv run bench/cpu_defaults.py --profile cpu-bf16     # the candidates of the AMX profile (run on such a CPU)

Runs the working tree's train.py with each candidate's edits (they apply to the branch of the profile that runs).
Writes bench/results/cpu-defaults-<profile>-<device>.json after every run; each run's output goes to --logs.
Compare the best with the reference port on the same machine (../shared/anchors in the development sandbox).
"""
import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import prepare
import runtime

RESULTS = Path(__file__).resolve().parent / "results"
W128 = dict(ASPECT_RATIO="32", HEAD_DIM="64")    # width 128: 2 heads of 64 at depth 4
W192 = dict(ASPECT_RATIO="48", HEAD_DIM="64")    # width 192: 3 heads
W256 = dict(ASPECT_RATIO="64", HEAD_DIM="128")   # width 256: 2 heads of 128, the reference's small config
CANDIDATES = {
    "cpu": {  # fp32 CPUs: the matmuls are slow, the 8192-way head is a large share of each step
        "SSSL-b12": dict(W128, DEPTH="4", WINDOW_PATTERN='"SSSL"', TOTAL_BATCH_SIZE="2**12", DEVICE_BATCH_SIZE="16"),
        "L-b12": dict(W128, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**12", DEVICE_BATCH_SIZE="16"),
        "L-b13": dict(W128, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13", DEVICE_BATCH_SIZE="32"),
        "L-b14": dict(W128, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**14", DEVICE_BATCH_SIZE="64"),
        "L-d3-b13": dict(W128, DEPTH="3", ASPECT_RATIO="42", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13",
                         DEVICE_BATCH_SIZE="32"),
        "L-d5-b13": dict(W128, DEPTH="5", ASPECT_RATIO="25", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13",
                         DEVICE_BATCH_SIZE="32"),
        "L-w192-b13": dict(W192, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13", DEVICE_BATCH_SIZE="32"),
        "L-w256-b13": dict(W256, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13", DEVICE_BATCH_SIZE="32"),
        "L-d6-b13": dict(W128, DEPTH="6", ASPECT_RATIO="21", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13",
                         DEVICE_BATCH_SIZE="32"),
    },
    "cpu-bf16": {  # AMX CPUs: bf16 matmuls at 4-7x fp32, so wider models pay
        "ref-small": dict(W256, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**14", DEVICE_BATCH_SIZE="64"),
        "L-w256-b13": dict(W256, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13", DEVICE_BATCH_SIZE="32"),
        "L-w192-b13": dict(W192, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**13", DEVICE_BATCH_SIZE="32"),
        "L-w256-d6-b14": dict(W256, DEPTH="6", ASPECT_RATIO="42", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**14",
                              DEVICE_BATCH_SIZE="64"),
        "L-b12": dict(W128, DEPTH="4", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**12", DEVICE_BATCH_SIZE="16"),
    },
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=prepare.PROFILE, choices=sorted(CANDIDATES),
                        help="whose candidates to run (default: this machine's profile)")
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--seeds", default="42", help="comma-separated SEEDs, one run each per candidate")
    parser.add_argument("--budget", type=float, default=300, help="training seconds per run")
    parser.add_argument("--logs", default="/tmp/cpu-defaults-logs", help="folder for each run's output")
    parser.add_argument("--out", help="JSON file to write (default bench/results/cpu-defaults-<profile>-<device>.json)")
    args = parser.parse_args()
    candidates = CANDIDATES[args.profile]
    names = [n for n in args.only.split(",") if n] or list(candidates)
    if set(names) - set(candidates):
        parser.error(f"--only: unknown {sorted(set(names) - set(candidates))}; {args.profile} has "
                     f"{', '.join(candidates)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: comma-separated integers")
    if not seeds or args.budget <= 0:
        parser.error("give at least one seed and a positive --budget")
    for name in names:  # a candidate that names no constant fails now, not after an hour
        try:
            harness.edit_constants((harness.REPO / "train.py").read_text(), candidates[name])
        except ValueError as e:
            parser.error(f"candidate {name}: {e}")

    device, machine = runtime.pick_device()
    slug = harness.slug(machine)
    out = Path(args.out) if args.out else RESULTS / f"cpu-defaults-{args.profile}-{slug}.json"
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    env = {"AUTORESEARCH_TIME_BUDGET": str(args.budget), "AUTORESEARCH_PROFILE": args.profile}
    print(f"{machine}; profile {args.profile}; budget {args.budget:g}s; seeds {seeds}", flush=True)
    results = []
    for name in names:
        for seed in seeds:
            log = Path(args.logs) / f"{args.profile}-{name}-seed{seed}.log"
            print(f"[{datetime.datetime.now():%H:%M:%S}] {name}, SEED {seed}", flush=True)
            summary, output, wall = harness.run_train({**candidates[name], "SEED": seed}, env=env, log=log,
                                                      timeout=args.budget * 6 + 600)
            if "val_bpb" not in summary:
                print(f"    crashed: see {log}", flush=True)
                continue
            results.append(dict(name=name, seed=seed, edits=candidates[name], val_bpb=float(summary["val_bpb"]),
                                num_steps=int(summary["num_steps"]), num_params_M=float(summary["num_params_M"]),
                                wall_seconds=round(wall, 1), summary=summary))
            print(f"    val_bpb {results[-1]['val_bpb']:.6f}, {summary['num_steps']} steps, {wall:.0f}s wall",
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            prepare.write_json(out, dict(machine=machine, profile=args.profile, budget=args.budget,
                                         date=datetime.date.today().isoformat(), runs=results))
    by_name = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    print(f"\n{'candidate':<16} {'val_bpb (mean)':>14} {'runs':>4} {'steps':>6} {'params M':>8}")
    for name, rs in sorted(by_name.items(), key=lambda item: statistics.mean(r["val_bpb"] for r in item[1])):
        print(f"{name:<16} {statistics.mean(r['val_bpb'] for r in rs):>14.4f} {len(rs):>4} "
              f"{round(statistics.mean(r['num_steps'] for r in rs)):>6} {rs[0]['num_params_M']:>8.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
