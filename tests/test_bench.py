"""
The bench scripts, each with its smallest arguments, on conftest.py's small prepared dataset:
- run as a user runs them (subprocesses): bench/device_check.sh --dry-run (the GPU check's steps on the CPU, tiny,
  bench/gpu.py among them, so the script cannot rot while no GPU is lent), bench/noise.py, bench/loader.py and
  bench/hub_load.py: each finishes and writes its JSON, checked against invariants (the hub's pacing bound, one
  result post per read of #results, bench/port_speed.py's step count against the run's own num_steps);
- bench/optimizers.py in-process with a smaller model (its fixed model, compiled six times, takes minutes here);
- bench/cpu_defaults.py and bench/port_speed.py, whose runs train for minutes: their candidates, plan and parsing
  against hand-computed values; bench/noise.py's plan and statistics likewise; harness.run_train stopping its run;
- bench/looped.py: in tests/test_bench_looped.py;
- bad arguments of every script stop with one line naming the fix, before any work (in-process, on an empty cache).

Run: uv run pytest tests/test_bench.py      (about 3-5 minutes on 2 cores, most of it the device check's dry run)
"""

import argparse
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness
import prepare

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import cpu_defaults  # noqa: E402  (bench/: the scripts' pure functions)
import noise  # noqa: E402
import port_speed  # noqa: E402

TINY = ["--edit", "DEPTH=2", "--edit", "ASPECT_RATIO=32", "--edit", "HEAD_DIM=32", "--edit",
        "TOTAL_BATCH_SIZE=2**11", "--edit", "DEVICE_BATCH_SIZE=8"]


def bench_env(cache, **env):
    return {**os.environ, "AUTORESEARCH_CACHE": str(cache), "PYTHON": sys.executable, **env}


def run(args, cache, timeout=900, **env):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=bench_env(cache, **env))


def run_main(script, args, monkeypatch):
    """bench/<script>.py's main() in this process with `args` on its command line."""
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *args])
    importlib.import_module(script).main()

# ---------------------------------------------------------------------------
# Whole runs


def test_device_check_dry_run_writes_every_step(small_cache, tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "bench/device_check.sh", "--dry-run"], small_cache, OUT=str(out),
                 PYTEST_ADDOPTS="-p no:xdist")  # as on the device machine: pytest without pytest-xdist
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["tests"]["tests"] > 0 and report["tests"]["failed"] == [], report["tests"]
    assert [r["backend"] for r in report["gpu"]["rows"]] == ["sdpa"] and report["gpu"]["rows"][0]["ms_per_step"] > 0
    assert report["memory"]["rows"][0]["micro_batch"] == 4  # CPU: no fitting, the tiny config's micro-batch
    assert math.isfinite(float(report["train"]["val_bpb"])) and report["train"]["device"] == "cpu"
    assert (out / "device_check.log").read_text().count("[") >= 4  # a time stamp per step


def test_device_check_parses_and_takes_only_dry_run(tmp_path):
    assert subprocess.run(["bash", "-n", "bench/device_check.sh"], cwd=REPO).returncode == 0
    for args in (["--dry"], ["--dry-run", "--extra"], ["run"]):
        result = run(["bash", "bench/device_check.sh", *args], tmp_path, OUT=str(tmp_path))
        assert result.returncode == 2 and "usage" in result.stderr, (args, result.stderr)


def test_noise_bench_smallest_run(small_cache, tmp_path):
    out = tmp_path / "noise.json"
    result = run([sys.executable, "bench/noise.py", "--repeats", "1", "--seeds", "0", "--budget", "2", *TINY,
                  "--out", str(out), "--logs", str(tmp_path)], small_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["runs"]] == [42] and report["edits"]["DEPTH"] == "2"
    assert report["groups"]["same seed"]["runs"] == 1 and report["groups"]["same seed"]["std"] is None
    run_ = report["runs"][0]
    assert math.isfinite(run_["val_bpb"]) and run_["num_steps"] > 10 and run_["precision"]
    # bench/port_speed.py reads the same step lines: it times every step after the 11th
    ms, timed = port_speed.step_ms(next(tmp_path.glob("*.log")).read_text())
    assert timed == run_["num_steps"] - 11 and ms > 0


def test_loader_bench_smallest_run(small_cache, tmp_path):
    out = tmp_path / "loader.json"
    result = run([sys.executable, "bench/loader.py", "--seconds", "0.2", "--out", str(out)], small_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["what"] for r in report["rows"]] == ["packing loader, B=128 T=2048", "packing loader, B=32 T=256",
                                                    "tokenizing on the fly (tiktoken, all cores)"]
    assert all(math.isfinite(r["tokens_per_second"]) and r["tokens_per_second"] > 0 for r in report["rows"])
    assert report["dataset"].startswith("from-small-") and report["machine"].endswith(f", {os.cpu_count()} cores")


def test_hub_load_bench_paced_run(tmp_path):
    out, rate = tmp_path / "hub.json", 30
    result = run([sys.executable, "bench/hub_load.py", "--agents", "2", "--workers", "1", "--seconds", "1",
                  "--pushes", "2", "--rate", str(rate), "--out", str(out)], tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    calls = {c["call"]: c for c in report["calls"]}
    assert calls["all"]["count"] == sum(c["count"] for name, c in calls.items() if name != "all")
    assert calls["all"]["errors"] == 0 and calls["all"]["p50_ms"] <= calls["all"]["p99_ms"]
    # every experiment reads both channels, the table and the leaves once, and posts one result
    counts = {calls[name]["count"] for name in ("read #results", "read #discussion", "results table", "leaves",
                                                "post result")}
    assert len(counts) == 1 and counts.pop() > 0, calls
    # paced: call k starts no earlier than k / rate after the start
    assert calls["all"]["count"] <= rate * report["elapsed"] + 1, report


def test_optimizers_bench_smallest_run(small_cache, monkeypatch, capsys):
    """Every rule for 6 steps (one timed), then the table against AdamW; eager, one narrow block, 2 rows a step."""
    monkeypatch.setattr(prepare, "CACHE_DIR", small_cache)
    optimizers = importlib.import_module("optimizers")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # compiling six models takes minutes here
    monkeypatch.setattr(optimizers, "WIDTH", 64)
    monkeypatch.setattr(optimizers, "ROWS", 2)
    monkeypatch.setattr(optimizers, "VAL_ROWS", 4)
    run_main("optimizers", ["--steps", str(optimizers.WARMUP_STEPS + 1)], monkeypatch)
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if re.match(r"\| \w+ \| [\d.]", line)]
    assert [row[0].strip("| ") for row in table] == list(optimizers.LRS)
    assert table[0][3] == "+0.0000" and table[0][5] == "1.00x |", table[0]
    for row in table:  # the loss against AdamW's, each rounded to 4 places
        assert float(row[3]) == pytest.approx(float(row[2]) - float(table[0][2]), abs=2e-4), row
    untrained = math.log(prepare.Tokenizer.from_directory().get_vocab_size())  # a near-uniform prediction's loss
    assert all(0 < float(row[2]) < untrained for row in table), table

# ---------------------------------------------------------------------------
# Pure functions, against hand-computed values


def test_noise_plan_and_stats():
    assert noise.plan(argparse.Namespace(load=False, repeats=2, seeds=2)) == [
        ("same seed", 42, False), ("same seed", 42, False), ("different seeds", 43, False),
        ("different seeds", 44, False)]
    assert noise.plan(argparse.Namespace(load=True, repeats=2, seeds=3)) == [
        ("alone", 42, False), ("busy", 42, True), ("alone", 42, False), ("busy", 42, True)]
    s = noise.stats([dict(val_bpb=1.0, num_steps=10), dict(val_bpb=1.4, num_steps=12),
                     dict(val_bpb=1.2, num_steps=11)])
    assert s["runs"] == 3 and s["steps_min"] == 10 and s["steps_max"] == 12
    # deviations -0.2, 0.2, 0: sample variance (0.04 + 0.04) / 2
    assert s["mean"] == pytest.approx(1.2) and s["std"] == pytest.approx(0.2) and s["spread"] == pytest.approx(0.4)
    assert noise.stats([dict(val_bpb=1.5, num_steps=7)])["std"] is None
    # steps 1, 2, 3 -> val_bpb 1, 3, 2: least squares 1 + 0.5 * steps, residuals -0.5, 1, -0.5 over 1 dof
    fit = noise.step_fit([dict(val_bpb=b, num_steps=n) for n, b in ((1, 1.0), (2, 3.0), (3, 2.0))])
    assert fit["per_step"] == pytest.approx(0.5) and fit["std_at_fixed_steps"] == pytest.approx(1.5 ** 0.5)
    assert noise.step_fit([dict(val_bpb=b, num_steps=5) for b in (1.0, 2.0, 3.0)]) is None


def test_cpu_defaults_candidates_are_what_their_names_say():
    """Each name spells its shape (window, dN depth, wN width, bN 2^N tokens; depth 4, width 128 unless named), the
    edits apply to train.py, and the batch splits into whole micro-batches at the CPU profiles' context of 256."""
    source = (REPO / "train.py").read_text()
    for profile, candidates in cpu_defaults.CANDIDATES.items():
        for name, edits in candidates.items():
            harness.edit_constants(source, edits)  # raises on a constant train.py lacks
            value = {k: eval(v) for k, v in edits.items()}
            if name == "ref-small":  # the reference README's small computer
                name = "L-w256-b14"
            window, *parts = name.split("-")
            shape = dict(d=4, w=128) | {p[0]: int(p[1:]) for p in parts}
            width = -(-value["DEPTH"] * value["ASPECT_RATIO"] // value["HEAD_DIM"]) * value["HEAD_DIM"]
            assert (value["WINDOW_PATTERN"], value["DEPTH"], width, value["TOTAL_BATCH_SIZE"]) == \
                (window, shape["d"], shape["w"], 2 ** shape["b"]), (profile, name)
            assert value["TOTAL_BATCH_SIZE"] % (value["DEVICE_BATCH_SIZE"] * 256) == 0, (profile, name)


def test_port_speed_reads_median_step_after_the_11th():
    # train.py's and the port's step lines, joined by \r as printed; steps 0-10 include compilation
    dts = [900] * 11 + [120, 100, 140, 130]
    output = "\r".join(f"step {i:05d} (5.0%) | loss: 7.1 | lrm: 1.00 | dt: {dt}ms | tok/sec: 1" for i, dt in
                       enumerate(dts)) + "\n---\nval_bpb: 1.9\n"
    assert port_speed.step_ms(output) == (125, 4)  # median of 100, 120, 130, 140
    with pytest.raises(SystemExit, match="no timed steps"):
        port_speed.step_ms(output.split("step 00011")[0])


HANGING = "__import__('time').sleep(600) or 42"  # a constant's value that hangs train.py at import
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads a process's children from /proc")


def terminate_mid_run(command, cache):
    """Run `command` and SIGTERM it once it has started train.py; its (exit code, output), after checking that the
    train.py did not outlive it (Linux /proc lists a process's children)."""
    parent = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=bench_env(cache))
    children, child = Path(f"/proc/{parent.pid}/task/{parent.pid}/children"), None
    try:
        for _ in range(1200):
            pids = children.read_text().split() if children.exists() else []
            child = next((int(pid) for pid in pids if b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()), None)
            if child or parent.poll() is not None:
                break
            time.sleep(0.1)
        assert child, "no train.py started"
        parent.send_signal(signal.SIGTERM)
        output = parent.communicate(timeout=60)[0]
        for _ in range(100):  # killed, it is reaped by its parent or, orphaned, by init
            if not Path(f"/proc/{child}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{child}").exists(), "train.py outlived its bench script"
        return parent.returncode, output
    finally:
        for pid in (parent.pid, child):
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@needs_proc
def test_run_train_stops_its_run_when_terminated(tmp_path):
    """SIGTERM to a bench script (a `kill`, a stopped job) must not leave its train.py running for minutes."""
    code = f"import harness; harness.run_train({{'SEED': {HANGING!r}}})"
    returncode, _ = terminate_mid_run([sys.executable, "-c", code], tmp_path)
    assert returncode != 0

# ---------------------------------------------------------------------------
# Bad arguments


BAD_ARGUMENTS = [
    ("gpu", ["--warmup", "0"], "--warmup: 0: must be at least 1"),
    ("gpu", ["--steps", "0"], "--steps: 0: must be at least 1"),
    ("gpu", ["--backends", "fa2"], "choose from"),
    ("gpu", ["--memory-gb", "24GB"], "give sizes in GB"),
    ("optimizers", ["--steps", "5"], "--steps: 5: must be at least 6"),
    ("loader", ["--seconds", "0"], "--seconds: 0.0: must be at least 0.1"),
    ("hub_load", ["--agents", "0"], "--agents: 0: must be at least 1"),
    ("hub_load", ["--agents", "2", "--workers", "3"], "--workers 3: at most --agents (2)"),
    ("hub_load", ["--rate", "-1"], "--rate: -1.0: must be at least 0"),
    ("noise", ["--edit", "DEPTHS=2"], "no constant DEPTHS"),
    ("noise", ["--repeats", "0"], "--repeats must be at least 1"),
    ("noise", ["--label", "a b"], "--label: letters"),
    ("cpu_defaults", ["--only", "huge"], "unknown ['huge']"),
    ("cpu_defaults", ["--seeds", "42,4x"], "comma-separated integers"),
    ("cpu_defaults", ["--budget", "0"], "positive --budget"),
    ("port_speed", ["--port", "missing.py", "--port-python", sys.executable], "must exist"),
    ("port_speed", ["--port", __file__, "--port-python", sys.executable, "--rounds", "0"], "--rounds at least 1"),
    ("looped", ["--optimizers", "normuon,sgd"], "--optimizers: unknown sgd; choose from adamw, normuon"),
    ("looped", ["--archs", "huge"], "--archs: unknown huge; choose from plain, gates"),
    ("looped", ["--seeds", "42,4x"], "--seeds: '42,4x': comma-separated integers"),
    ("looped", ["--factors", "1,0"], "comma-separated positive numbers"),
    ("looped", ["--budget", "0"], "--budget: 0.0: must be at least 0.1"),
    ("looped", ["--edit", "SEED=1"], "--edit SEED: bench/looped.py sets it in every run"),
    ("looped", ["--edit", "DEPTHS=2"], "no constant DEPTHS"),
]


@pytest.mark.parametrize("script, args, message", BAD_ARGUMENTS, ids=[" ".join([s, *a]) for s, a, _ in BAD_ARGUMENTS])
def test_bad_arguments_stop_with_one_line(script, args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path)  # empty: a script that got past its checks stops here
    with pytest.raises(SystemExit) as stop:
        run_main(script, args, monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines, one line says what is wrong
    assert last.startswith(f"{script}.py: error: ") and message in last, err
