"""
The bench scripts, each with its smallest arguments, on a prepared stdlib cache:
- run as a user runs them (subprocesses): bench/device_check.sh --dry-run (the GPU check's steps on the CPU, tiny,
  bench/gpu.py among them, so the script cannot rot while no GPU is lent), bench/noise.py, bench/loader.py and
  bench/hub_load.py: each finishes and writes its JSON, checked against invariants (the hub's pacing bound, one
  result post per read of #results, bench/port_speed.py's step count against the run's own num_steps);
- bench/optimizers.py in-process with a smaller model (its fixed model, compiled six times, takes minutes here);
- bench/cpu_defaults.py and bench/port_speed.py, whose runs train for minutes: their candidates, plan and parsing
  against hand-computed values; bench/noise.py's plan and statistics likewise; bench/runs.py's helpers;
- bench/looped.py: a one-run sweep and grid of a tiny model (its tables against the run's own summary; a second
  invocation runs nothing), a crashing run (stored, shown, not retried; another --edit refused in the same file),
  and its tables (mean ± std, marks), statistics and plan from hand-made runs against hand-computed values;
- bad arguments of every script stop with one line naming the fix, before any work (in-process, on an empty cache).

Run: uv run pytest tests/test_bench.py      (about 3-5 minutes on 2 cores, most of it the device check's dry run)
"""

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import cpu_defaults  # noqa: E402  (bench/: the scripts' pure functions)
import looped  # noqa: E402
import noise  # noqa: E402
import port_speed  # noqa: E402
import runs  # noqa: E402

TINY = ["--edit", "DEPTH=2", "--edit", "ASPECT_RATIO=32", "--edit", "HEAD_DIM=32", "--edit",
        "TOTAL_BATCH_SIZE=2**11", "--edit", "DEVICE_BATCH_SIZE=8"]


def run(args, cache, timeout=900, **env):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "AUTORESEARCH_CACHE": str(cache), "PYTHON": sys.executable, **env})


def run_main(script, args, monkeypatch):
    """bench/<script>.py's main() in this process with `args` on its command line."""
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *args])
    importlib.import_module(script).main()

# ---------------------------------------------------------------------------
# Whole runs


def test_device_check_dry_run_writes_every_step(stdlib_cache, tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "bench/device_check.sh", "--dry-run"], stdlib_cache, OUT=str(out))
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


def test_noise_bench_smallest_run(stdlib_cache, tmp_path):
    out = tmp_path / "noise.json"
    result = run([sys.executable, "bench/noise.py", "--repeats", "1", "--seeds", "0", "--budget", "2", *TINY,
                  "--out", str(out), "--logs", str(tmp_path)], stdlib_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["runs"]] == [42] and report["edits"]["DEPTH"] == "2"
    assert report["groups"]["same seed"]["runs"] == 1 and report["groups"]["same seed"]["std"] is None
    run_ = report["runs"][0]
    assert math.isfinite(run_["val_bpb"]) and run_["num_steps"] > 10 and run_["precision"]
    # bench/port_speed.py reads the same step lines: it times every step after the 11th
    ms, timed = port_speed.step_ms(next(tmp_path.glob("*.log")).read_text())
    assert timed == run_["num_steps"] - 11 and ms > 0


def test_loader_bench_smallest_run(stdlib_cache, tmp_path):
    out = tmp_path / "loader.json"
    result = run([sys.executable, "bench/loader.py", "--seconds", "0.2", "--out", str(out)], stdlib_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["what"] for r in report["rows"]] == ["packing loader, B=128 T=2048", "packing loader, B=32 T=256",
                                                    "tokenizing on the fly (tiktoken, all cores)"]
    assert all(math.isfinite(r["tokens_per_second"]) and r["tokens_per_second"] > 0 for r in report["rows"])
    assert report["dataset"].startswith("stdlib-") and report["machine"].endswith(f", {os.cpu_count()} cores")


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


def test_optimizers_bench_smallest_run(stdlib_cache, monkeypatch, capsys):
    """Every rule for 6 steps (one timed), then the table against AdamW; eager, one narrow block, 2 rows a step."""
    monkeypatch.setattr(prepare, "CACHE_DIR", stdlib_cache)
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
            runs.edit_constants(source, edits)  # raises on a constant train.py lacks
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


def test_runs_helpers():
    assert runs.slug("Intel(R) Xeon(R) Processor, 2 threads") == "Intel-R-Xeon-R-Processor-2-threads"
    source = "if a:\n    DEPTH = 8                # blocks\nelse:\n    DEPTH = 4\nDEPTHS = 1\n"
    assert runs.edit_constants(source, {"DEPTH": "2**3"}) == \
        "if a:\n    DEPTH = 2**3                # blocks\nelse:\n    DEPTH = 2**3\nDEPTHS = 1\n"
    with pytest.raises(ValueError, match="no constant WIDTH"):
        runs.edit_constants(source, {"WIDTH": "1"})
    output = "---\nval_bpb: 9\nstep 5\n---\nval_bpb:          1.25\nnum_steps: 12\nnot a pair here\n"
    assert runs.read_summary(output) == {"val_bpb": "1.25", "num_steps": "12"}
    assert runs.read_summary("crashed\n") == {}
    assert runs.parse_edits(["DEPTH=6", "WINDOW_PATTERN=\"L\""]) == {"DEPTH": "6", "WINDOW_PATTERN": '"L"'}
    for bad in ("DEPTH", "DEPTH=", "2x=1"):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            runs.parse_edits([bad])
    check = runs.at_least(2)
    assert check("2") == 2
    for bad in ("1", "x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            check(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        runs.at_least(0.1, float)("nan")

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

# ---------------------------------------------------------------------------
# bench/looped.py

LOOPED_TINY = ["--optimizers", "normuon", "--factors", "1", "--budget", "2", *TINY, "--edit",
               "TOTAL_BATCH_SIZE=2**13", "--edit", "DEVICE_BATCH_SIZE=32"]  # 12 steps or more: total_tokens_M >= 0.1


def summary_lines(log):
    """The key: value lines after a log's last `---` line."""
    tail = log.read_text().rsplit("\n---\n", 1)[1]
    return dict(re.findall(r"^(\w+):\s+(\S+)$", tail, re.M))


def md_row(md, start):
    row = next(line for line in md.splitlines() if line.startswith(start))
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_looped_bench_smallest_run_resumes(stdlib_cache, tmp_path):
    """The sweep runs normuon at 1x on gates with SEED 42; the grid, at the same budget, gates with SEED 42: the
    same run, so one run. The tables carry its summary's numbers; the same command again runs nothing and changes
    nothing."""
    out, logs, jsonl = tmp_path / "looped.md", tmp_path / "logs", tmp_path / "looped.runs.jsonl"
    command = [sys.executable, "bench/looped.py", "--archs", "gates", "--seeds", "42", "--sweep-budget", "2",
               *LOOPED_TINY, "--out", str(out), "--logs", str(logs)]
    result = run(command, stdlib_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lr = looped.LRS["normuon"]
    (r,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert (r["arch"], r["optimizer"], r["lr"], r["seed"], r["budget"], r["status"]) == ("gates", "normuon", lr, 42,
                                                                                         2.0, "ok")
    (log,) = logs.glob("*.log")
    s = summary_lines(log)
    assert (r["val_bpb"], r["num_steps"], r["training_seconds"], r["total_tokens_M"]) == (
        float(s["val_bpb"]), int(s["num_steps"]), float(s["training_seconds"]), float(s["total_tokens_M"]))
    assert (r["profile"], r["dataset"], r["precision"]) == (s["profile"], s["dataset"], s["precision"])
    assert r["edits"]["DEPTH"] == "2" and r["machine"]
    speed = float(s["total_tokens_M"]) * 1e6 / int(s["num_steps"]) / (port_speed.step_ms(log.read_text())[0] / 1000)
    assert speed > 0
    md = out.read_text()
    assert md.startswith(f"# `bench/looped.py` on {r['machine']}\n")
    assert md_row(md, "| normuon |") == ["normuon", f"**{lr:g}: {float(s['val_bpb']):.4f}**"]
    assert md_row(md, "| gates | normuon |") == ["gates", "normuon", f"{lr:g}", f"{float(s['val_bpb']):.4f}", "1",
                                                 "-", s["num_steps"], f"{speed:,.0f}", ""]

    before = jsonl.read_bytes(), md
    again = run(command, stdlib_cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: 0 runs to run" in again.stdout and "grid: 0 runs to run" in again.stdout, again.stdout
    assert (jsonl.read_bytes(), out.read_text()) == before


def test_looped_bench_stores_a_crash_once(stdlib_cache, tmp_path):
    """A run that stops at start-up (1000 tokens a step: no whole number of rows): stored as a crash with train.py's
    line, shown in the sweep table, not run again, and the grid has no lr for it; another --edit in the same file
    is refused."""
    out, jsonl = tmp_path / "looped.md", tmp_path / "looped.runs.jsonl"
    command = [sys.executable, "bench/looped.py", "--archs", "plain", "--seeds", "42", *LOOPED_TINY,
               "--edit", "TOTAL_BATCH_SIZE=1000", "--out", str(out), "--logs", str(tmp_path)]
    first = run([*command, "--stage", "sweep"], stdlib_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["status"] == "crash", record
    assert record["error"].startswith("TOTAL_BATCH_SIZE 1000 is not a multiple of DEVICE_BATCH_SIZE"), record
    assert f"| normuon | {looped.LRS['normuon']:g}: crashed ({record['error']}) |" in out.read_text()

    again = run([*command, "--stage", "all"], stdlib_cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: 0 runs to run" in again.stdout and "grid: skipping normuon" in again.stdout, again.stdout
    assert len(jsonl.read_text().splitlines()) == 1

    other = run([*command, "--edit", "DEPTH=3"], stdlib_cache)
    assert other.returncode == 1 and not other.stdout, other.stdout
    assert other.stderr.strip().splitlines()[-1].startswith(f"{jsonl} holds runs of another edits"), other.stderr
    assert len(jsonl.read_text().splitlines()) == 1


def test_looped_cells_marks_and_plan():
    rows = [dict(status="ok", val_bpb=b, num_steps=n, tokens_per_second=t)
            for b, n, t in ((1.0, 10, 100.0), (1.4, 12, 300.0), (1.2, 11, 200.0))]
    c = looped.cell(rows + [dict(status="crash", error="boom")])
    # deviations -0.2, 0.2, 0: sample variance 0.08 / 2
    assert (c["n"], c["steps"], c["crashes"]) == (3, (10, 12), ["boom"])
    assert (c["mean"], c["std"], c["tokens_per_second"]) == pytest.approx((1.2, 0.2, 200.0))
    ref = dict(n=2, mean=1.0, std=0.1)
    assert looped.pooled_std(c, ref) == pytest.approx(((2 * 0.2**2 + 1 * 0.1**2) / 3) ** 0.5)  # 0.173
    assert looped.versus(c, ref) == "+0.2000"  # within 2 x 0.173
    assert looped.versus(dict(c, mean=0.6), ref) == "-0.4000 *"
    assert looped.versus(dict(n=1, mean=1.5, std=None), dict(n=1, mean=1.0, std=None)) == "+0.5000"  # no spread
    assert looped.versus(ref, ref) == "reference" and looped.versus(dict(n=0), ref) == "-"

    args = argparse.Namespace(optimizers=["normuon", "newton_muon"], archs=["plain", "gates"], seeds=[42, 43],
                              factors=[0.5, 1, 2], budget=300.0, sweep_budget=100.0)
    sweep = looped.sweep_plan(args)
    assert [(s["arch"], s["optimizer"], s["seed"], s["budget"]) for s in sweep] == \
        [("gates", "normuon", 42, 100.0)] * 3 + [("gates", "newton_muon", 42, 100.0)] * 3
    assert [s["lr"] for s in sweep] == [looped.LRS[o] * f for o in args.optimizers for f in (0.5, 1, 2)]
    sweep_runs = [dict(s, status="ok", val_bpb=b) for s, b in zip(sweep, (1.5, 1.4, 1.6, 1.2, 1.3, 1.1))]
    decoys = [dict(sweep_runs[0], arch="plain", val_bpb=0.5), dict(sweep_runs[0], budget=300.0, val_bpb=0.5),
              dict(sweep_runs[0], lr=0.3, status="crash")]
    lrs = looped.best_lrs(sweep_runs + decoys, 100.0)
    assert lrs == {"normuon": looped.LRS["normuon"], "newton_muon": 2 * looped.LRS["newton_muon"]}
    grid, newton = looped.grid_plan(args, lrs), looped.newton_plan(args, lrs)
    assert len(grid) == 2 * 2 * 2 and len(newton) == 2 * 3 * 3 and {s["arch"] for s in newton} == {"gates"}
    default = (looped.train.NEWTON_REFRESH_STEPS, looped.train.NEWTON_EMA)
    keys = [looped.run_key(s, {}) for s in grid if s["optimizer"] == "newton_muon" and s["arch"] == "gates"]
    # the newton table's cell of train.py's values is the grid's newton_muon runs: the same keys, run once
    assert keys == [looped.run_key(s, {}) for s in newton if (s["refresh"], s["ema"]) == default]
    assert len({looped.run_key(s, {}) for s in grid + newton}) == len(grid) + len(newton) - 2


def test_looped_tables_from_stored_runs(tmp_path):
    """Hand-made runs: the sweep picks each lr; the grid shows mean ± sample std per cell against plain normuon, a
    crash's line, nothing of a run at another lr; the Newton-Muon table compares with train.py's values."""
    default = (looped.train.NEWTON_REFRESH_STEPS, looped.train.NEWTON_EMA)

    def rec(arch, optimizer, lr, seed, budget, bpb, newton=None, steps=200, speed=5000.0):
        newton = newton or (default if optimizer == "newton_muon" else (None, None))
        return dict(arch=arch, optimizer=optimizer, lr=lr, seed=seed, budget=budget, refresh=newton[0],
                    ema=newton[1], date="2026-12-01T10:00:00", status="ok", val_bpb=bpb, num_steps=steps,
                    tokens_per_second=speed)
    sweep = [rec("gates", "normuon", lr, 42, 100.0, b) for lr, b in ((0.04, 1.70), (0.08, 1.65), (0.16, 1.68))]
    sweep += [rec("gates", "adamw", 0.016, 42, 100.0, 1.80), rec("gates", "newton_muon", 0.08, 42, 100.0, 1.75)]
    crash = dict(rec("gates", "adamw", 0.016, 43, 300.0, None), status="crash", error="FAIL: loss nan at step 7")
    grid = [rec("plain", "normuon", 0.08, 42, 300.0, 1.60, steps=200, speed=5000.0),
            rec("plain", "normuon", 0.08, 43, 300.0, 1.62, steps=204, speed=5100.0),
            rec("gates", "normuon", 0.08, 42, 300.0, 1.50), rec("gates", "normuon", 0.08, 43, 300.0, 1.51),
            rec("gates", "normuon", 0.16, 44, 300.0, 0.10),  # another lr: not in the table
            rec("gates", "adamw", 0.016, 42, 300.0, 1.62), crash,
            rec("gates", "newton_muon", 0.08, 42, 300.0, 1.55), rec("gates", "newton_muon", 0.08, 43, 300.0, 1.57),
            rec("gates", "newton_muon", 0.08, 42, 300.0, 1.50, (4, 0.5)),
            rec("gates", "newton_muon", 0.08, 43, 300.0, 1.50, (4, 0.5))]
    context = dict(machine="a CPU, 2 threads", profile="cpu", dataset="stdlib-x", precision="fp32", edits={})
    args = argparse.Namespace(budget=300.0, sweep_budget=100.0)
    md = looped.markdown(sweep + grid, context, args, tmp_path / "looped.runs.jsonl")
    assert md_row(md, "| normuon |") == ["normuon", "0.04: 1.7000, **0.08: 1.6500**, 0.16: 1.6800"]
    assert md_row(md, "| adamw |") == ["adamw", "**0.016: 1.8000**"]
    # plain normuon 1.60, 1.62: mean 1.61, std 0.02 / sqrt(2) = 0.0141
    assert md_row(md, "| plain | normuon |") == ["plain", "normuon", "0.08", "1.6100 ± 0.0141", "2", "reference",
                                                 "200-204", "5,050", ""]
    # 1.50, 1.51: std 0.0071; pooled with the reference sqrt((0.02^2 / 2 + 0.01^2 / 2) / 2) = 0.0112, 2x < 0.105
    assert md_row(md, "| gates | normuon |") == ["gates", "normuon", "0.08", "1.5050 ± 0.0071", "2", "-0.1050 *",
                                                 "200", "5,000", ""]
    # one run: pooled = the reference's own std, 0.0141; 0.01 is within 2x
    assert md_row(md, "| gates | adamw |") == ["gates", "adamw", "0.016", "1.6200", "1", "+0.0100", "200", "5,000",
                                               "FAIL: loss nan at step 7"]
    ref_newton, tuned = md_row(md, f"| gates | {default[0]} | {default[1]:g} |"), md_row(md, "| gates | 4 | 0.5 |")
    assert ref_newton[3:6] == ["1.5600 ± 0.0141", "2", "reference"]
    assert tuned[3:6] == ["1.5000 ± 0.0000", "2", "-0.0600 *"]  # pooled sqrt(0.0002 / 2) = 0.01
    assert "| gates | newton_muon | 0.08 | 1.5600 ± 0.0141 |" in md


def test_looped_refuses_runs_of_another_budget_unit():
    """Runs from before a CPU's budget counted work (no budget_unit) never share a table with runs after it."""
    context = dict(machine="m", profile="cpu", dataset="d", precision="fp32", edits={}, budget_unit="work, ...")
    before = {k: v for k, v in context.items() if k != "budget_unit"}
    assert "budget_unit None" in looped.mixing([dict(before, budget=300.0)], context, {300.0})
    assert looped.mixing([dict(context, budget=300.0)], context, {300.0}) is None
