"""Matrix optimizers on plain and looped transformers at the real budget: train.py's six matrix optimizers on four
architectures, each optimizer at its best lr from a short sweep, two seeds or more per cell; then Newton-Muon's
preconditioner refresh interval and EMA on the looped architectures. Tables of val_bpb (mean ± std over seeds),
steps, tokens/s and wall time.

    uv run bench/looped.py --dry-run          # the plan: what is stored, what would run
    uv run bench/looped.py                    # all of it: ~10 hours on 2 cores; the same command resumes
    uv run bench/looped.py --stage sweep --optimizers normuon,muon
    uv run bench/looped.py --stage grid --archs plain,gates --seeds 42,43,44

Stages, in this order (--stage all runs the three):
- sweep: each optimizer at 0.5x, 1x and 2x (--factors) of its lr in bench/optimizers.py (LRS: the best of a sweep on
  a small looped model at 300 steps) on `gates`, SEED 42, --sweep-budget seconds each (a third of --budget: the
  whole sweep then costs less than one seed of the grid). The lowest val_bpb gives the optimizer's lr for the
  other stages. A shorter run may favour a larger lr; with steps of 2x apart that rarely changes the pick, and a
  best lr at the edge of the sweep is flagged in the table (extend it with e.g. --factors 0.25,0.5,1,2,4).
- grid: every optimizer x architecture x seed at --budget, at the sweep's lr.
- newton: newton_muon on the looped architectures, NEWTON_REFRESH_STEPS x NEWTON_EMA over REFRESH x EMAS; train.py's
  own values are the grid's newton_muon runs, not run twice.

Every finished run is a line of bench/results/looped-<device>.runs.jsonl, synced to disk before the next run
starts: Ctrl-C or a crash loses at most the run in progress, and the same command resumes. A run is known by its
edits and budget, so a run two stages share runs once. A crashed run is stored with its last error line and not
retried (delete its line to retry). bench/results/looped-<device>.md is rewritten from all stored runs after
each run. One file holds one machine, profile, dataset, precision, pair of budgets and set of --edit: anything
else stops with a line saying so (--out picks another file). Each run's whole output goes to --logs.
"""
import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
import port_speed
import prepare
import runtime
import train
from optimizers import LRS

RESULTS = Path(__file__).resolve().parent / "results"
LOOPS = ("N_LOOPS", "LOOP_CONDITIONING", "LOOP_ROUTING")
ARCHS = {  # each sets all of LOOPS, so an edited default in train.py cannot relabel a row; the rest stays as it is
    "plain": dict(zip(LOOPS, ("1", '"gates"', '"none"'))),
    "gates": dict(zip(LOOPS, ("2", '"gates"', '"none"'))),
    "loopformer": dict(zip(LOOPS, ("2", '"loopformer"', '"none"'))),
    "mor": dict(zip(LOOPS, ("2", '"gates"', '"mor"'))),  # MOR_CAPACITY as train.py has it
}
VARIED = {*LOOPS, "MATRIX_OPTIMIZER", "MATRIX_LR", "SEED", "NEWTON_REFRESH_STEPS",
          "NEWTON_EMA"}  # set per run here: an --edit of one would relabel the tables
SWEEP_ARCH, SWEEP_SEED = "gates", 42
REFERENCE = ("plain", "normuon")  # the grid's cells are compared with this one
REFRESH, EMAS = (4, 16, 64), (0.5, 0.8, 0.95)
STAGES = ("sweep", "grid", "newton")
MARK_STDS = 2  # a difference beyond this many of its stds is marked as larger than the measured spread
IGNORED_LINE = re.compile(r"^(WARNING: |[IW]\d{4} )|Warning: |^\s*warnings\.warn\(")  # not a crash's cause

# ---------------------------------------------------------------------------
# The plan: runs as specs, each known by its edits and budget


def spec(arch, optimizer, lr, seed, budget, newton=None):
    """One run. newton_muon always carries its (refresh, ema), train.py's when not given, so the grid's runs and
    the newton stage's cell of train.py's values are the same run."""
    if optimizer == "newton_muon":
        newton = newton or (train.NEWTON_REFRESH_STEPS, train.NEWTON_EMA)
    return dict(arch=arch, optimizer=optimizer, lr=float(f"{lr:.4g}"), seed=seed, budget=budget,
                refresh=newton[0] if newton else None, ema=newton[1] if newton else None)


def run_edits(s, extra):
    edits = {**ARCHS[s["arch"]], "MATRIX_OPTIMIZER": f'"{s["optimizer"]}"', "MATRIX_LR": f"{s['lr']:g}",
             "SEED": str(s["seed"])}
    if s["refresh"] is not None:
        edits.update(NEWTON_REFRESH_STEPS=str(s["refresh"]), NEWTON_EMA=str(s["ema"]))
    return {**edits, **extra}


def run_key(s, extra):
    return json.dumps(dict(edits=run_edits(s, extra), budget=s["budget"]), sort_keys=True)


def describe_spec(s):
    newton = f" refresh {s['refresh']} EMA {s['ema']:g}" if s["refresh"] is not None else ""
    return f"{s['arch']} {s['optimizer']} lr {s['lr']:g}{newton} SEED {s['seed']}, {s['budget']:g}s"


def sweep_plan(args):
    return [spec(SWEEP_ARCH, o, LRS[o] * f, SWEEP_SEED, args.sweep_budget) for o in args.optimizers
            for f in args.factors]


def grid_plan(args, lrs):
    return [spec(a, o, lrs[o], seed, args.budget) for seed in args.seeds for a in args.archs for o in args.optimizers
            if o in lrs]


def newton_plan(args, lrs):
    if "newton_muon" not in args.optimizers or "newton_muon" not in lrs:
        return []
    return [spec(a, "newton_muon", lrs["newton_muon"], seed, args.budget, (refresh, ema)) for seed in args.seeds
            for a in args.archs if a != "plain" for refresh in REFRESH for ema in EMAS]


def stage_plan(stage, args, lrs):
    if stage == "sweep":
        return sweep_plan(args)
    return grid_plan(args, lrs) if stage == "grid" else newton_plan(args, lrs)


def waiting(stage, args, lrs):
    """The optimizers whose runs in `stage` wait for a finished sweep run."""
    wanted = [] if stage == "sweep" else args.optimizers if stage == "grid" else \
        [o for o in args.optimizers if o == "newton_muon" and any(a != "plain" for a in args.archs)]
    return [o for o in wanted if o not in lrs]

# ---------------------------------------------------------------------------
# Stored runs


def load_records(path):
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise SystemExit(f"{path} line {i} is not a JSON record (an interrupted write?): delete that line "
                             "and run the same command again") from None
    return records


def append_record(path, record):
    """One line, on disk before the next run starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def mixing(records, context, budgets):
    """Why `records` cannot share a table with runs in `context` at `budgets`, or None."""
    for r in records:
        other = {k: r.get(k) for k in context if r.get(k) != context[k]}
        if r["budget"] not in budgets:
            other["budget"] = r["budget"]
        if other:
            return f"holds runs of another {', '.join(f'{k} {v!r}' for k, v in other.items())}"
    return None


def last_error_line(output):
    lines = [line.strip() for line in output.splitlines() if line.strip() and not IGNORED_LINE.search(line)]
    return lines[-1][:300] if lines else "no output"


def run_one(s, args, context, log):
    """Train one spec; its record, finished or crashed."""
    timeout = s["budget"] * 6 + 600
    try:
        summary, output, wall = harness.run_train(run_edits(s, args.edits), log=log, timeout=timeout,
                                                  env={"AUTORESEARCH_TIME_BUDGET": str(s["budget"])})
    except subprocess.TimeoutExpired:
        summary, output, wall = {}, f"timed out after {timeout:g}s", timeout
    record = dict(key=run_key(s, args.edits), **s, **context, date=datetime.datetime.now().isoformat("T", "seconds"),
                  wall_seconds=round(wall, 1))
    if "val_bpb" not in summary:
        return dict(record, status="crash", error=last_error_line(output))
    tokens_m, steps = float(summary["total_tokens_M"]), int(summary["num_steps"])
    ms, _ = port_speed.step_ms(output)  # wall time: on a CPU training_seconds counts work
    return dict(record, status="ok", profile=summary["profile"], dataset=summary["dataset"],
                precision=summary["precision"], val_bpb=float(summary["val_bpb"]), num_steps=steps,
                training_seconds=float(summary["training_seconds"]), total_tokens_M=tokens_m,
                tokens_per_second=tokens_m * 1e6 / steps / (ms / 1000), summary=summary)

# ---------------------------------------------------------------------------
# Tables


def best_lrs(records, sweep_budget):
    """Each optimizer's lr of lowest val_bpb among its finished sweep runs."""
    best = {}
    for r in records:
        if (r["status"] == "ok" and r["arch"] == SWEEP_ARCH and r["seed"] == SWEEP_SEED
                and r["budget"] == sweep_budget and is_default_newton(r)):
            if r["optimizer"] not in best or r["val_bpb"] < best[r["optimizer"]]["val_bpb"]:
                best[r["optimizer"]] = r
    return {o: r["lr"] for o, r in best.items()}


def is_default_newton(r):
    return r["refresh"] is None or (r["refresh"], r["ema"]) == (train.NEWTON_REFRESH_STEPS, train.NEWTON_EMA)


def cell(records):
    """val_bpb over the finished runs of one cell: n, mean, sample std (None below 2 runs), steps, tokens/s, wall
    seconds; and the crashed runs' error lines."""
    ok = [r for r in records if r["status"] == "ok"]
    bpbs = [r["val_bpb"] for r in ok]
    return dict(n=len(ok), mean=statistics.mean(bpbs) if ok else None,
                std=statistics.stdev(bpbs) if len(ok) > 1 else None,
                steps=(min(r["num_steps"] for r in ok), max(r["num_steps"] for r in ok)) if ok else None,
                tokens_per_second=statistics.mean(r["tokens_per_second"] for r in ok) if ok else None,
                wall=statistics.mean(r["wall_seconds"] for r in ok) if ok else None,
                crashes=[r["error"] for r in records if r["status"] == "crash"])


def pooled_std(cells):
    """The sample variances of the cells with 2 runs or more, pooled by their degrees of freedom: a seed spread taken
    as the same in all those cells (two runs alone give a std of one degree of freedom, often far too small); None
    with no such cell."""
    cells = [c for c in cells if c["n"] > 1]
    dof = sum(c["n"] - 1 for c in cells)
    return math.sqrt(sum((c["n"] - 1) * c["std"] ** 2 for c in cells) / dof) if dof else None


def cells_text(n):
    return f"{n} cell" + "s" * (n != 1)


def seed_spreads(settings):
    """({optimizer: its seed spread}, text): each optimizer's cells pooled, as seeds scatter mano or adamuon far more
    than normuon; an optimizer with no cell of 2 runs takes every cell's pooled spread. None: nothing measured."""
    cells = {k: cell(group) for k, group in settings.items()}
    everything = pooled_std(cells.values())
    own = {o: pooled_std([c for k, c in cells.items() if k[1] == o]) for o in LRS}
    count = {o: sum(c["n"] > 1 for k, c in cells.items() if k[1] == o) for o in LRS}
    text = ", ".join(f"{o} {spread:.4f} ({cells_text(count[o])})" for o, spread in own.items() if spread is not None)
    if everything is None:
        return dict.fromkeys(LRS), "none yet: no cell has 2 runs, so nothing is marked"
    if None in own.values():
        text += f"{'; ' if text else ''}the others every cell's {everything:.4f} ({cells_text(sum(count.values()))})"
    return {o: everything if spread is None else spread for o, spread in own.items()}, text


def versus(c, ref, spread, ref_spread):
    """c's mean minus ref's, marked * when beyond MARK_STDS x the std of that difference, each mean's std its
    optimizer's seed spread over sqrt(its runs); '-' when either has no run."""
    if c is ref:
        return "reference"
    if not c["n"] or not ref or not ref["n"]:
        return "-"
    diff = c["mean"] - ref["mean"]
    marked = (spread is not None and ref_spread is not None
              and abs(diff) > MARK_STDS * math.sqrt(spread ** 2 / c["n"] + ref_spread ** 2 / ref["n"]))
    return f"{diff:+.4f}" + (" *" if marked else "")


def cell_columns(c, ref, spread, ref_spread):
    """| val_bpb | n | vs | steps | tokens/s | wall s | crashed | of one cell."""
    if not c["n"]:
        bpb, steps, speed, wall = "-", "-", "-", "-"
    else:
        bpb = f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if c["std"] is not None else "")
        low, high = c["steps"]
        steps = f"{low}" if low == high else f"{low}-{high}"
        speed, wall = f"{c['tokens_per_second']:,.0f}", f"{c['wall']:,.0f}"
    crashed = "; ".join(c["crashes"]) if c["crashes"] else ""
    return f"{bpb} | {c['n']} | {versus(c, ref, spread, ref_spread)} | {steps} | {speed} | {wall} | {crashed} |"


def section(title, columns, rows, note=None):
    """A markdown table under its title; a line saying so when it has no rows yet."""
    table = [f"| {' | '.join(columns)} |", f"|{' --- |' * len(columns)}", *rows] if rows else ["No runs yet."]
    return [f"## {title}", "", *([note, ""] if note else []), *table, ""]


def sweep_table(records, sweep_budget):
    lrs, rows = best_lrs(records, sweep_budget), []
    for o in LRS:
        tried = sorted((r for r in records if r["optimizer"] == o and r["arch"] == SWEEP_ARCH
                        and r["seed"] == SWEEP_SEED and r["budget"] == sweep_budget and is_default_newton(r)),
                       key=lambda r: r["lr"])
        cells = [f"{r['lr']:g}: crashed ({r['error']})" if r["status"] == "crash" else
                 f"**{r['lr']:g}: {r['val_bpb']:.4f}**" if r["lr"] == lrs.get(o) else f"{r['lr']:g}: {r['val_bpb']:.4f}"
                 for r in tried]
        edge = o in lrs and len(tried) > 1 and lrs[o] in (tried[0]["lr"], tried[-1]["lr"])
        note = (" (best at the edge: extend the sweep)" if edge else
                " (one lr only: not swept)" if len(tried) == 1 else "")
        if tried:
            rows.append(f"| {o} | {', '.join(cells)}{note} |")
    return section(f"Learning-rate sweep: `{SWEEP_ARCH}`, SEED {SWEEP_SEED}, {sweep_budget:g} s per run",
                   ["optimizer", "lr: val_bpb"], rows,
                   "val_bpb per matrix lr; bold: the lowest, the lr of the grid and the Newton-Muon table.")


def cell_header(reference):
    return ["val_bpb", "n", f"vs {reference}", "steps", "tokens/s", "wall s", "crashed"]


def grid_table(records, budget, lrs, spreads):
    cells = {(a, o): cell([r for r in records if r["arch"] == a and r["optimizer"] == o and r["lr"] == lrs[o]
                           and r["budget"] == budget and is_default_newton(r)])
             for a in ARCHS for o in LRS if o in lrs}
    rows = [f"| {a} | {o} | {lrs[o]:g} | {cell_columns(c, cells.get(REFERENCE), spreads[o], spreads[REFERENCE[1]])}"
            for (a, o), c in cells.items() if c["n"] or c["crashes"]]
    return section(f"Optimizer x architecture: {budget:g} s per run, each optimizer at its sweep's lr",
                   ["architecture", "optimizer", "lr", *cell_header(" ".join(REFERENCE))], rows)


def newton_table(records, budget, lrs, spreads):
    default, rows = (train.NEWTON_REFRESH_STEPS, train.NEWTON_EMA), []
    spread = spreads["newton_muon"]
    for a in ARCHS:
        mine = [r for r in records if r["arch"] == a and a != "plain" and r["optimizer"] == "newton_muon"
                and r["lr"] == lrs.get("newton_muon") and r["budget"] == budget]
        cells = {p: cell([r for r in mine if (r["refresh"], r["ema"]) == p])
                 for p in sorted({(r["refresh"], r["ema"]) for r in mine})}
        if len(cells) > 1:  # the grid's run alone is no comparison
            rows += [f"| {a} | {refresh} | {ema:g} | {cell_columns(c, cells.get(default), spread, spread)}"
                     for (refresh, ema), c in cells.items()]
    return section(f"Newton-Muon: NEWTON_REFRESH_STEPS x NEWTON_EMA on the looped architectures, {budget:g} s per run",
                   ["architecture", "refresh", "EMA", *cell_header(f"{default[0]}, {default[1]:g}")], rows)


def markdown(records, context, args, jsonl):
    lrs = best_lrs(records, args.sweep_budget)
    settings = {}
    for r in records:
        if r["budget"] == args.budget:
            settings.setdefault((r["arch"], r["optimizer"], r["lr"], r["refresh"], r["ema"]), []).append(r)
    spreads, spread_text = seed_spreads(settings)
    finished = sum(r["status"] == "ok" for r in records)
    dates = sorted(r["date"][:10] for r in records)
    archs = "; ".join(f"{a} {', '.join(f'{k} = {v}' for k, v in edits.items())}" for a, edits in ARCHS.items())
    prose = [
        f"Profile `{context['profile']}`, dataset `{context['dataset']}`, {context['precision']}; edits besides the "
        f"tables' own: {context['edits'] or 'none'}. {finished} finished and {len(records) - finished} crashed "
        f"runs, {dates[0]} to {dates[-1]}, each in `{jsonl.name}`. Rewritten by `uv run bench/looped.py` after "
        f"every run. Architectures: {archs}; the rest as train.py has it. The sweep's lrs are multiples of "
        "bench/optimizers.py's.",
        "val_bpb: mean ± sample std over seeds, n finished runs. vs: the mean minus the reference cell's; * when "
        f"the difference exceeds {MARK_STDS}x its std, i.e. is larger than the measured spread: a mean's std is its "
        "optimizer's seed spread over the square root of its runs, and an optimizer's seed spread is the std of "
        f"its {args.budget:g} s cells of 2 runs or more, their variances pooled by degrees of freedom "
        f"({spread_text}). "
        "steps: fewest-most over the runs. tokens/s: a step's tokens over its median wall time after the 11th, "
        "averaged over the runs. wall s: a run's whole wall time, averaged over the runs, compilation and "
        "evaluation included. On a CPU the budget counts the model's FLOPs, not time, so an optimizer's own work "
        "costs wall time but no steps: optimizers and Newton-Muon's refresh intervals compare at equal steps. The "
        "orthogonalisation's cost shows in tokens/s; a refresh's, which the median step leaves out, only in wall s. "
        "Other work on the machine inflates both. crashed: each crashed run's last error line."]
    return "\n".join([f"# `bench/looped.py` on {context['machine']}", "",
                      *(line for text in prose for line in (textwrap.fill(text, 116, break_on_hyphens=False), "")),
                      *sweep_table(records, args.sweep_budget),
                      *grid_table(records, args.budget, lrs, spreads),
                      *newton_table(records, args.budget, lrs, spreads)])

# ---------------------------------------------------------------------------
# Command line


def names_of(known):
    def parse(text):
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                                             f"choose from {', '.join(known)}")
        return list(dict.fromkeys(names))
    return parse


def numbers(kind, positive):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v]
        except ValueError:
            values = []
        if not values or (positive and not all(v > 0 for v in values)):
            raise argparse.ArgumentTypeError(f"{text!r}: comma-separated {'positive ' if positive else ''}"
                                             f"{'integers' if kind is int else 'numbers'}")
        return list(dict.fromkeys(values))
    return parse


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("all", *STAGES), default="all", help="which stage to run (default all)")
    parser.add_argument("--optimizers", type=names_of(list(LRS)), default=list(LRS), help="comma-separated")
    parser.add_argument("--archs", type=names_of(list(ARCHS)), default=list(ARCHS), help="comma-separated")
    parser.add_argument("--seeds", type=numbers(int, False), default=[42, 43], help="SEEDs of the grid and "
                        "the Newton-Muon table (default 42,43); the sweep runs SEED 42")
    parser.add_argument("--factors", type=numbers(float, True), default=[0.5, 1, 2],
                        help="the sweep's lrs, as multiples of bench/optimizers.py's (default 0.5,1,2)")
    parser.add_argument("--budget", type=harness.at_least(0.1, float), default=prepare.TIME_BUDGET,
                        help=f"training seconds of a grid or Newton-Muon run (default {prepare.TIME_BUDGET:g})")
    parser.add_argument("--sweep-budget", type=harness.at_least(0.1, float),
                        help="training seconds of a sweep run (default a third of --budget)")
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=VALUE",
                        help="a constant of train.py for every run (a tiny model for a test)")
    parser.add_argument("--out", help="markdown file to write; the runs go beside it as .runs.jsonl "
                        "(default bench/results/looped-<device>.md)")
    parser.add_argument("--logs", default="/tmp/looped-logs", help="folder for each run's output")
    parser.add_argument("--dry-run", action="store_true", help="list the planned runs and what is stored; run nothing")
    args = parser.parse_args()
    args.sweep_budget = args.sweep_budget or args.budget / 3
    args.edits = harness.parse_edits(args.edit)
    if VARIED & set(args.edits):
        parser.error(f"--edit {', '.join(sorted(VARIED & set(args.edits)))}: bench/looped.py sets it in every run; "
                     "choose it with --archs, --optimizers or --seeds")
    stages = STAGES if args.stage == "all" else (args.stage,)
    source = (harness.REPO / "train.py").read_text()
    try:  # a missing constant fails now, not in an hour
        harness.edit_constants(source, args.edits)
    except ValueError as e:
        parser.error(str(e))
    for a in dict.fromkeys([*([SWEEP_ARCH] if "sweep" in stages else []), *args.archs]):
        try:
            harness.edit_constants(source, run_edits(spec(a, "newton_muon", 0.01, 0, 1), {}))
        except ValueError as e:
            parser.error(f"architecture {a}: {e}")
    return args, stages


def print_plan(stages, args, records):
    """--dry-run: every planned run with what is stored of it, in order."""
    stored, lrs = {r["key"]: r for r in records}, best_lrs(records, args.sweep_budget)
    todo = 0
    for stage in stages:
        for s in stage_plan(stage, args, lrs):
            r = stored.get(run_key(s, args.edits))
            todo += r is None
            state = "to run" if r is None else f"crashed: {r['error']}" if r["status"] == "crash" else \
                f"stored: val_bpb {r['val_bpb']:.4f}"
            print(f"{stage:<6} {describe_spec(s):<60} {state}")
        for o in waiting(stage, args, lrs):
            print(f"{stage:<6} {o}: {len(stage_plan(stage, args, {o: 0.0}))} runs wait for its sweep's lr")
    print(f"{todo} runs to run now, more after the sweep" if any(waiting(s, args, lrs) for s in stages[1:]) else
          f"{todo} runs to run")


def main():
    args, stages = parse_args()
    device, machine = runtime.pick_device()
    dtype, _ = runtime.pick_dtype(device)
    context = dict(machine=machine, profile=prepare.PROFILE, dataset=prepare.dataset_label(),
                   precision="bf16" if dtype == torch.bfloat16 else "fp32", edits=args.edits,
                   budget_unit=runtime.budget_unit(device))
    out = Path(args.out) if args.out else RESULTS / f"looped-{harness.slug(machine)}.md"
    jsonl = out.with_suffix(".runs.jsonl")
    records = load_records(jsonl)
    why = mixing(records, context, {args.budget, args.sweep_budget})
    if why:
        raise SystemExit(f"{jsonl} {why}: pass --out for another file, or rerun with the same settings")
    print(f"{machine}; profile {context['profile']}; dataset {context['dataset']}; {context['precision']}; budget "
          f"{args.budget:g}s, sweep {args.sweep_budget:g}s; edits {args.edits or 'none'}; {len(records)} runs stored "
          f"in {jsonl}", flush=True)
    if args.dry_run:
        print_plan(stages, args, records)
        return
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    for stage in stages:
        lrs = best_lrs(records, args.sweep_budget)  # after the sweep stage, its result
        stored = {r["key"] for r in records}
        todo = [s for s in stage_plan(stage, args, lrs) if run_key(s, args.edits) not in stored]
        for o in waiting(stage, args, lrs):
            print(f"{stage}: skipping {o}: no finished sweep run to take its lr from (run --stage sweep)", flush=True)
        print(f"{stage}: {len(todo)} runs to run", flush=True)
        for i, s in enumerate(todo, 1):
            log = Path(args.logs) / f"{harness.slug(describe_spec(s))}.log"
            print(f"[{datetime.datetime.now():%H:%M:%S}] {stage} {i}/{len(todo)}: {describe_spec(s)} (log {log})",
                  flush=True)
            record = run_one(s, args, context, log)
            append_record(jsonl, record)
            records.append(record)
            prepare.write_atomic(out, lambda tmp: tmp.write_text(markdown(records, context, args, jsonl)))
            print(f"    val_bpb {record['val_bpb']:.6f}, {record['num_steps']} steps, {record['wall_seconds']:.0f}s "
                  "wall" if record["status"] == "ok" else f"    crashed: {record['error']}", flush=True)
    if records:
        prepare.write_atomic(out, lambda tmp: tmp.write_text(markdown(records, context, args, jsonl)))
        print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (harness.py): the run in progress is killed, not stored
        raise SystemExit("\nstopped: every finished run is stored; the same command resumes") from None
