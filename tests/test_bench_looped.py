"""
bench/looped.py: a one-run sweep and grid of a tiny model (its tables against the run's own summary; a second
invocation runs nothing), a crashing run (stored, shown, not retried; another --edit refused in the same file), and
its tables (mean ± std, marks), statistics and plan from hand-made runs against hand-computed values.

Run: uv run pytest tests/test_bench_looped.py
"""

import argparse
import json
import re
import sys

import pytest

from test_bench import HANGING, TINY, needs_proc, run, terminate_mid_run  # it puts bench/ on sys.path
import looped  # noqa: E402
import port_speed  # noqa: E402

LOOPED_TINY = ["--optimizers", "normuon", "--factors", "1", "--budget", "2", *TINY, "--edit",
               "TOTAL_BATCH_SIZE=2**13", "--edit", "DEVICE_BATCH_SIZE=32"]  # 12 steps or more: total_tokens_M >= 0.1


def summary_lines(log):
    """The key: value lines after a log's last `---` line."""
    tail = log.read_text().rsplit("\n---\n", 1)[1]
    return dict(re.findall(r"^(\w+):\s+(\S+)$", tail, re.M))


def md_row(md, start):
    row = next(line for line in md.splitlines() if line.startswith(start))
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_looped_bench_smallest_run_resumes(small_cache, tmp_path):
    """The sweep runs normuon at 1x on gates with SEED 42; the grid, at the same budget, gates with SEED 42: the
    same run, so one run. The tables carry its summary's numbers; the same command again runs nothing and changes
    nothing."""
    out, logs, jsonl = tmp_path / "looped.md", tmp_path / "logs", tmp_path / "looped.runs.jsonl"
    command = [sys.executable, "bench/looped.py", "--archs", "gates", "--seeds", "42", "--sweep-budget", "2",
               *LOOPED_TINY, "--out", str(out), "--logs", str(logs)]
    result = run(command, small_cache)
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
    assert md_row(md, "| normuon |") == ["normuon", f"**{lr:g}: {float(s['val_bpb']):.4f}** (one lr only: not swept)"]
    assert md_row(md, "| gates | normuon |") == ["gates", "normuon", f"{lr:g}", f"{float(s['val_bpb']):.4f}", "1",
                                                 "-", s["num_steps"], f"{speed:,.0f}", f"{r['wall_seconds']:,.0f}", ""]

    before = jsonl.read_bytes(), md
    again = run(command, small_cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: 0 runs to run" in again.stdout and "grid: 0 runs to run" in again.stdout, again.stdout
    assert (jsonl.read_bytes(), out.read_text()) == before


@needs_proc
def test_looped_bench_stopped_mid_run_says_so_and_stores_nothing(small_cache, tmp_path):
    """SIGTERM while a run trains (here: hangs at import): that run is killed, not stored, and the script says the
    same command resumes, in one line instead of a traceback."""
    out = tmp_path / "looped.md"
    returncode, output = terminate_mid_run(
        [sys.executable, "bench/looped.py", "--archs", "plain", "--seeds", "42", *LOOPED_TINY, "--edit",
         f"WARMUP_RATIO={HANGING}", "--out", str(out), "--logs", str(tmp_path)], small_cache)
    assert returncode == 1 and output.rstrip().endswith("the same command resumes"), output
    assert "Traceback" not in output, output
    assert not out.with_suffix(".runs.jsonl").exists()


def test_looped_bench_stores_a_crash_once(small_cache, tmp_path):
    """A run that stops at start-up (1000 tokens a step: no whole number of rows): stored as a crash with train.py's
    line, shown in the sweep table, not run again, and the grid has no lr for it; another --edit in the same file
    is refused."""
    out, jsonl = tmp_path / "looped.md", tmp_path / "looped.runs.jsonl"
    command = [sys.executable, "bench/looped.py", "--archs", "plain", "--seeds", "42", *LOOPED_TINY,
               "--edit", "TOTAL_BATCH_SIZE=1000", "--out", str(out), "--logs", str(tmp_path)]
    first = run([*command, "--stage", "sweep"], small_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["status"] == "crash", record
    assert record["error"].startswith("TOTAL_BATCH_SIZE 1000 is not a multiple of DEVICE_BATCH_SIZE"), record
    assert f"| normuon | {looped.LRS['normuon']:g}: crashed ({record['error']}) (one lr only: not swept) |" in \
        out.read_text()

    again = run([*command, "--stage", "all"], small_cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: 0 runs to run" in again.stdout and "grid: skipping normuon" in again.stdout, again.stdout
    assert len(jsonl.read_text().splitlines()) == 1

    other = run([*command, "--edit", "DEPTH=3"], small_cache)
    assert other.returncode == 1 and not other.stdout, other.stdout
    assert other.stderr.strip().splitlines()[-1].startswith(f"{jsonl} holds runs of another edits"), other.stderr
    assert len(jsonl.read_text().splitlines()) == 1


def test_looped_cells_marks_and_plan():
    rows = [dict(status="ok", val_bpb=b, num_steps=n, tokens_per_second=t, wall_seconds=w)
            for b, n, t, w in ((1.0, 10, 100.0, 50.0), (1.4, 12, 300.0, 70.0), (1.2, 11, 200.0, 90.0))]
    c = looped.cell(rows + [dict(status="crash", error="boom")])
    # deviations -0.2, 0.2, 0: sample variance 0.08 / 2
    assert (c["n"], c["steps"], c["crashes"]) == (3, (10, 12), ["boom"])
    assert (c["mean"], c["std"], c["tokens_per_second"], c["wall"]) == pytest.approx((1.2, 0.2, 200.0, 70.0))
    ref, single = dict(n=2, mean=1.0, std=0.1), dict(n=1, mean=1.5, std=None)
    spread = looped.pooled_std([c, ref, single])  # the single run adds no degree of freedom
    assert spread == pytest.approx(((2 * 0.2**2 + 1 * 0.1**2) / 3) ** 0.5)  # 0.173
    assert looped.pooled_std([single, dict(n=0)]) is None
    # the difference's std: sqrt(spread^2 / 3 + spread^2 / 2) = 0.158
    assert looped.versus(c, ref, spread, spread) == "+0.2000"  # within 2 x 0.158
    assert looped.versus(dict(c, mean=0.6), ref, spread, spread) == "-0.4000 *"
    # each mean's std from its own optimizer's spread: sqrt(0.1^2 / 3 + 0.3^2 / 2) = 0.218, 2 x 0.218 > 0.4
    assert looped.versus(dict(c, mean=0.6), ref, 0.1, 0.3) == "-0.4000"
    assert looped.versus(dict(c, mean=0.6), ref, 0.3, 0.1) == "-0.4000 *"  # sqrt(0.03 + 0.005) = 0.187
    assert looped.versus(single, dict(single, mean=1.0), None, None) == "+0.5000"  # no spread measured: no mark
    assert looped.versus(ref, ref, spread, spread) == "reference"
    assert looped.versus(dict(n=0), ref, spread, spread) == "-"

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

    def rec(arch, optimizer, lr, seed, budget, bpb, newton=None, steps=200, speed=5000.0, wall=400.0):
        newton = newton or (default if optimizer == "newton_muon" else (None, None))
        return dict(arch=arch, optimizer=optimizer, lr=lr, seed=seed, budget=budget, refresh=newton[0],
                    ema=newton[1], date="2026-12-01T10:00:00", status="ok", val_bpb=bpb, num_steps=steps,
                    tokens_per_second=speed, wall_seconds=wall)
    sweep = [rec("gates", "normuon", lr, 42, 100.0, b) for lr, b in ((0.04, 1.70), (0.08, 1.65), (0.16, 1.68))]
    sweep += [rec("gates", "adamw", 0.016, 42, 100.0, 1.80), rec("gates", "newton_muon", 0.08, 42, 100.0, 1.75)]
    sweep += [rec("gates", "mano", lr, 42, 100.0, b) for lr, b in ((0.005, 1.90), (0.01, 1.85))]
    crash = dict(rec("gates", "adamw", 0.016, 43, 300.0, None), status="crash", error="FAIL: loss nan at step 7")
    grid = [rec("plain", "normuon", 0.08, 42, 300.0, 1.60, steps=200, speed=5000.0),
            rec("plain", "normuon", 0.08, 43, 300.0, 1.62, steps=204, speed=5100.0, wall=1000.0),
            rec("gates", "normuon", 0.08, 42, 300.0, 1.50), rec("gates", "normuon", 0.08, 43, 300.0, 1.51),
            rec("gates", "normuon", 0.16, 44, 300.0, 0.10),  # another lr: not in the table
            rec("gates", "adamw", 0.016, 42, 300.0, 1.62), crash,
            rec("plain", "mano", 0.01, 42, 300.0, 1.64), rec("plain", "mano", 0.01, 43, 300.0, 1.70),
            rec("gates", "newton_muon", 0.08, 42, 300.0, 1.55), rec("gates", "newton_muon", 0.08, 43, 300.0, 1.57),
            rec("gates", "newton_muon", 0.08, 42, 300.0, 1.50, (4, 0.5), wall=600.0),
            rec("gates", "newton_muon", 0.08, 43, 300.0, 1.50, (4, 0.5), wall=650.0)]
    context = dict(machine="a CPU, 2 threads", profile="cpu", dataset="stdlib-x", precision="fp32", edits={})
    args = argparse.Namespace(budget=300.0, sweep_budget=100.0)
    md = looped.markdown(sweep + grid, context, args, tmp_path / "looped.runs.jsonl")
    assert md_row(md, "| normuon |") == ["normuon", "0.04: 1.7000, **0.08: 1.6500**, 0.16: 1.6800"]
    assert md_row(md, "| adamw |") == ["adamw", "**0.016: 1.8000** (one lr only: not swept)"]
    assert md_row(md, "| mano |") == ["mano", "0.005: 1.9000, **0.01: 1.8500** (best at the edge: extend the sweep)"]
    # plain normuon 1.60, 1.62: mean 1.61, std 0.02 / sqrt(2) = 0.0141
    assert md_row(md, "| plain | normuon |") == ["plain", "normuon", "0.08", "1.6100 ± 0.0141", "2", "reference",
                                                 "200-204", "5,050", "700", ""]
    # seed spreads of the 300 s cells of 2 runs, one degree of freedom each. normuon: variances 0.0002 (plain),
    # 0.00005 (gates), sqrt(0.00025 / 2) = 0.0112; newton_muon: 0.0002 (gates), 0 (gates 4, 0.5), 0.0100; mano: 0.0018
    # (plain), 0.0424; adamw, with no cell of 2 runs, all five cells': sqrt(0.00225 / 5) = 0.0212
    assert ("(normuon 0.0112 (2 cells), mano 0.0424 (1 cell), newton_muon 0.0100 (2 cells); the others every "
            "cell's 0.0212 (5 cells))") in " ".join(md.split())
    # 1.50, 1.51: std 0.0071; 0.105 is beyond 2 x sqrt(0.0112^2 / 2 + 0.0112^2 / 2) = 0.0224
    assert md_row(md, "| gates | normuon |") == ["gates", "normuon", "0.08", "1.5050 ± 0.0071", "2", "-0.1050 *",
                                                 "200", "5,000", "400", ""]
    # one run: 0.01 is within 2 x sqrt(0.0212^2 + 0.0112^2 / 2)
    assert md_row(md, "| gates | adamw |") == ["gates", "adamw", "0.016", "1.6200", "1", "+0.0100", "200", "5,000",
                                               "400", "FAIL: loss nan at step 7"]
    # mano's own spread: 0.06 is within 2 x sqrt(0.0424^2 / 2 + 0.0112^2 / 2) = 0.0620, though beyond 2 x 0.0212
    assert md_row(md, "| plain | mano |")[3:6] == ["1.6700 ± 0.0424", "2", "+0.0600"]
    ref_newton, tuned = md_row(md, f"| gates | {default[0]} | {default[1]:g} |"), md_row(md, "| gates | 4 | 0.5 |")
    assert ref_newton[3:6] == ["1.5600 ± 0.0141", "2", "reference"]
    assert tuned[3:6] == ["1.5000 ± 0.0000", "2", "-0.0600 *"]  # beyond 2 x sqrt(0.01^2 / 2 + 0.01^2 / 2)
    assert tuned[8] == "625" and ref_newton[8] == "400"  # a refresh's cost shows in wall time alone
    assert "| gates | newton_muon | 0.08 | 1.5600 ± 0.0141 |" in md


def test_looped_refuses_runs_of_another_budget_unit():
    """Runs from before a CPU's budget counted work (no budget_unit) never share a table with runs after it."""
    context = dict(machine="m", profile="cpu", dataset="d", precision="fp32", edits={}, budget_unit="work, ...")
    before = {k: v for k, v in context.items() if k != "budget_unit"}
    assert "budget_unit None" in looped.mixing([dict(before, budget=300.0)], context, {300.0})
    assert looped.mixing([dict(context, budget=300.0)], context, {300.0}) is None
