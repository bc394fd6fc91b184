"""Our training step against the reference's at an identical config, side by side on this machine: rounds of
one run of the reference's CPU port and one of train.py set to the port's config (the reference README's small
computer: depth 4, width 256, 2 heads of 128, window L, 2^14 tokens per step in one batch of 64), each a short
budget, then the median step time of every run over its steps after the 11th, and the ratio.

    uv run bench/port_speed.py --port DIR/ref_train.py --port-python VENV/bin/python [--rounds 3] [--budget 60]

The port comes from the development sandbox's ../shared/anchors (ref_port.py writes DIR/ref_train.py; its venv
has torch 2.9.1); it imports this repository's prepare.py, so both train on the active dataset. Precision
follows our profile: fp32 for cpu (REF_DTYPE=float32), bf16 for cpu-bf16. Writes bench/results/port-speed-<device>.json.
"""
import argparse
import datetime
import os
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
PORT_CONFIG = dict(DEPTH="4", ASPECT_RATIO="64", HEAD_DIM="128", WINDOW_PATTERN='"L"', TOTAL_BATCH_SIZE="2**14",
                   DEVICE_BATCH_SIZE="64")


def step_ms(output):
    """Median step time (ms) over the steps after the 11th (the first include compilation), and their count."""
    steps = [(int(s), int(dt)) for s, dt in re.findall(r"step (\d+) .*?\| dt: (\d+)ms", output)]
    timed = [dt for s, dt in steps if s > 10]
    if not timed:
        raise SystemExit(f"no timed steps in a run's output:\n{output[-2000:]}")
    return statistics.median(timed), len(timed)


def run_port(args):
    env = {**os.environ, "REF_PREPARE_DIR": str(harness.REPO), "REF_TIME_BUDGET": str(args.budget),
           "REF_DTYPE": "bfloat16" if prepare.PROFILE == "cpu-bf16" else "float32"}
    result = subprocess.run([args.port_python, args.port], cwd=Path(args.port).parent, capture_output=True,
                            text=True, env=env, timeout=args.budget * 6 + 900)
    return result.stdout + result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", required=True, help="the port's ref_train.py")
    parser.add_argument("--port-python", required=True, help="the python of the port's venv")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs, alternating")
    parser.add_argument("--budget", type=int, default=60, help="training seconds per run")
    args = parser.parse_args()
    if not Path(args.port).is_file() or not Path(args.port_python).exists():
        parser.error("--port and --port-python must exist: make them with ../shared/anchors/run_ref_cpu.sh")
    if args.rounds < 1 or args.budget < 20:
        parser.error("--rounds at least 1, --budget at least 20 seconds (the first 11 steps are not timed)")
    device, machine = runtime.pick_device()
    rows = []
    for i in range(args.rounds):
        for who in ("port", "ours"):
            print(f"[{datetime.datetime.now():%H:%M:%S}] round {i + 1}/{args.rounds}: {who}", flush=True)
            if who == "port":
                output = run_port(args)
            else:
                _, output, _ = harness.run_train(PORT_CONFIG, env={"AUTORESEARCH_TIME_BUDGET": str(args.budget)})
            ms, n = step_ms(output)
            rows.append(dict(round=i + 1, who=who, median_step_ms=ms, timed_steps=n))
            print(f"    median step {ms:.0f} ms over {n} steps", flush=True)
    medians = {who: statistics.median(r["median_step_ms"] for r in rows if r["who"] == who) for who in ("port", "ours")}
    ratio = medians["port"] / medians["ours"]
    print(f"{machine}, profile {prepare.PROFILE}: port {medians['port']:.0f} ms/step, ours {medians['ours']:.0f} "
          f"ms/step: ours runs at {ratio:.3f}x the port's speed (median of {args.rounds} runs each)")
    out = RESULTS / f"port-speed-{harness.slug(machine)}.json"
    RESULTS.mkdir(exist_ok=True)
    prepare.write_json(out, dict(machine=machine, profile=prepare.PROFILE, date=datetime.date.today().isoformat(),
                                 budget=args.budget, config=PORT_CONFIG, runs=rows, median_step_ms=medians,
                                 speed_ratio_ours_over_port=ratio))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
