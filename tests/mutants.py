"""
Mutation check, run on demand (not in CI: pytest collects only test_*.py). Each mutation replaces one piece of
source text with a wrong version, the kind of bug the tests are meant to catch, and runs the tests named for it:
they must fail. A mutation whose tests pass SURVIVED: the tests cannot see that bug.

Works on a copy of the working tree (tracked and untracked files git does not ignore) in a temporary folder, never
on the tree itself; one mutation at a time, the file restored after each. Before the mutations, each distinct test
selection runs once unmutated and must pass, so a failure is the mutation's doing.

    uv run tests/mutants.py --list              # the mutations, numbered
    uv run tests/mutants.py                     # all of them (a long run: several tests train or prepare data)
    uv run tests/mutants.py --only 7 --only 8   # some, by number or name
    uv run tests/mutants.py --no-baseline       # skip the unmutated runs

Exit status 1 when a mutation survived, or its text is no longer in the file (stale: update the list), or a
baseline failed.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, file, text, mutated text, pytest arguments); the text must occur exactly once in the file
MUTATIONS = [
    # issue 14, items 1-7
    ("split by Python's salted hash()", "prepare.py",
     'h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")', "h = hash(key) % 2**64",
     ["tests/test_prepare.py", "-k", "split"]),
    ("time budget overrun", "runtime.py",
     "done = self.steps >= self.FREE_STEPS and self.seconds >= TIME_BUDGET",
     "done = self.steps >= self.FREE_STEPS and self.seconds >= 2 * TIME_BUDGET",
     ["tests/test_runtime.py", "-k", "budget"]),
    ("the free steps charged", "runtime.py", "if step >= self.FREE_STEPS:", "if step >= 0:",
     ["tests/test_runtime.py", "-k", "budget"]),
    ("Newton-Muon never refreshed", "train.py",
     'if MATRIX_OPTIMIZER == "newton_muon" and (step + 1) % NEWTON_REFRESH_STEPS == 0:',
     'if False and MATRIX_OPTIMIZER == "newton_muon":',
     ["tests/test_train_e2e.py", "-k", "newton"]),
    ("Newton-Muon refreshed at the wrong interval", "train.py",
     'if MATRIX_OPTIMIZER == "newton_muon" and (step + 1) % NEWTON_REFRESH_STEPS == 0:',
     'if MATRIX_OPTIMIZER == "newton_muon" and (step + 1) % (NEWTON_REFRESH_STEPS + 1) == 0:',
     ["tests/test_train_e2e.py", "-k", "newton"]),
    ("precision probe always fp32", "runtime.py", "if bf16 < 0.8 * fp32:", "if False:",
     ["tests/test_runtime.py", "-k", "probe"]),
    ("precision probe boundary moved", "runtime.py", "if bf16 < 0.8 * fp32:", "if bf16 <= 0.8 * fp32:",
     ["tests/test_runtime.py", "-k", "probe"]),
    ("flex masks keyed by the first window only", "runtime.py", "for w in set(windows)}", "for w in [windows[0]]}",
     ["tests/test_runtime.py", "-k", "flex"]),
    ("FLOPs: attention counted half", "train.py",
     "attention = sum(12 * width * min(w + 1, T) for w in self.window_sizes)\n        return",
     "attention = sum(6 * width * min(w + 1, T) for w in self.window_sizes)\n        return",
     ["tests/test_model.py", "-k", "flops"]),
    ("FLOPs: head counted forward only", "train.py", "return 6 * (self.lm_head.weight.numel() +",
     "return 2 * self.lm_head.weight.numel() + 6 * (", ["tests/test_model.py", "-k", "flops"]),
    ("bpb counts tokens of zero bytes", "prepare.py", "total_nats += (loss * (nbytes > 0)).sum().item()",
     "total_nats += loss.sum().item()", ["tests/test_prepare.py", "-k", "bpb or golden"]),
    ("eval rows one short", "prepare.py", "pack_rows(docs, 1, T), EVAL_TOKENS // T)",
     "pack_rows(docs, 1, T), EVAL_TOKENS // T - 1)", ["tests/test_prepare.py", "-k", "eval_rows or golden"]),
    ("gpu.py --warmup 0 accepted", "bench/gpu.py", 'parser.add_argument("--warmup", type=harness.at_least(1),',
     'parser.add_argument("--warmup", type=int,', ["tests/test_bench.py", "-k", "bad_arguments"]),
    ("optimizers.py --steps 5 accepted", "bench/optimizers.py", "type=harness.at_least(WARMUP_STEPS + 1)", "type=int",
     ["tests/test_bench.py", "-k", "bad_arguments"]),
    # issue 13: looped models, LoopFormer conditioning and causal Mixture-of-Recursions (tests/test_loop.py)
    ("gates: the first loop gated too", "train.py", "return [None] + [norm(loop_embed)",
     "return [norm(self.loop_embeds[0])] + [norm(loop_embed)",
     ["tests/test_loop.py", "-k", "computes_what_it_did"]),
    ("gates: projections drawn, not zero", "train.py", "        if self.loopformer:\n", "        if True:\n",
     ["tests/test_loop.py", "-k", "initial_weights"]),
    ("loopformer: zero projections (the dead saddle)", "train.py", "        if self.loopformer:\n",
     "        if False:\n", ["tests/test_loop.py", "-k", "loopformer_gates"]),
    ("loopformer: the first loop unconditioned", "train.py", "return list(F.silu(c))",
     "return [None] + list(F.silu(c))[1:]", ["tests/test_loop.py", "-k", "identity"]),
    ("loopformer: t counts loops, not fractions of the trajectory", "train.py",
     "t = torch.arange(n, device=self.cos.device) / n", "t = torch.arange(n, device=self.cos.device) * 1.0",
     ["tests/test_loop.py", "-k", "embedded_time"]),
    ("mor: gathered rows attend past their window", "train.py", "(causal & (offset <= w))", "(causal)",
     ["tests/test_loop.py", "-k", "capacity_one"]),
    ("mor: capacity term in per-token losses", "train.py", "return loss + aux_loss if reduction == \"mean\" else loss",
     "return loss + aux_loss", ["tests/test_loop.py", "-k", "capacity_one"]),
    ("mor: padding slots written back updated", "train.py",
     "kept = torch.where(taken.gather(1, order)[..., None], update, rows)", "kept = update",
     ["tests/test_loop.py", "-k", "untaken_tokens"]),
    ("mor: expert-choice top-k over the whole sequence", "train.py", "taken = wants & (wants.cumsum(dim=1) <= k)",
     "taken = torch.zeros_like(wants).scatter(1, logits.masked_fill(~selected, -1e9).topk(k, dim=1).indices, True)",
     ["tests/test_loop.py", "-k", "causal"]),
    ("mor: no straight-through factor", "train.py", "update = update + (update - rows) * (p - p.detach())",
     "update = update", ["tests/test_loop.py", "-k", "routed_model and normuon"]),
    ("mor: Newton-Muon statistics count padding rows", "train.py", "if routed_rows and x.dim() == 3:",
     "if False:", ["tests/test_loop.py", "-k", "newton_statistics"]),
    ("mor: FLOPs count all T rows", "train.py", "+ k / T * (matmuls", "+ 1 * (matmuls",
     ["tests/test_loop.py", "-k", "flops"]),
    ("mor: a first capacity below 1 accepted", "train.py", "and c[0] == 1\n", "\n",
     ["tests/test_loop.py", "-k", "bad_capacity"]),
    # the bench scripts' own logic
    ("hub load unpaced", "bench/hub_load.py", "        if self.rate:\n", "        if False:\n",
     ["tests/test_bench.py", "-k", "hub_load"]),
    ("noise load test not alternating", "bench/noise.py",
     'for _ in range(args.repeats) for group, busy in (("alone", False), ("busy", True))]',
     'for group, busy in (("alone", False), ("busy", True)) for _ in range(args.repeats)]',
     ["tests/test_bench.py", "-k", "noise_plan"]),
    ("port speed times the compiling steps", "bench/port_speed.py", "if s > 10]", "if s >= 10]",
     ["tests/test_bench.py", "-k", "port_speed or noise_bench"]),
    ("summary read after the first ---", "harness.py", 'lines[::-1].index("---")',
     'len(lines) - 1 - lines.index("---")', ["tests/test_harness.py", "-k", "helpers"]),
    ("device check ignores extra arguments", "bench/device_check.sh", 'case "$*" in', 'case "${1:-}" in',
     ["tests/test_bench.py", "-k", "device_check_parses"]),
    ("more hub client threads than agents accepted", "bench/hub_load.py", "if args.workers > args.agents:",
     "if False:", ["tests/test_bench.py", "-k", "bad_arguments"]),
    ("a sweep candidate that is not what its name says", "bench/cpu_defaults.py", '"L-d6-b13": dict(W128, DEPTH="6"',
     '"L-d6-b13": dict(W128, DEPTH="5"', ["tests/test_bench.py", "-k", "cpu_defaults"]),
    ("optimizer table against AdamW with the sign flipped", "bench/optimizers.py", "{r['loss'] - adamw['loss']:+.4f}",
     "{adamw['loss'] - r['loss']:+.4f}", ["tests/test_bench.py", "-k", "optimizers_bench"]),
]


def copy_tree(dest):
    """The working tree's files as they are now: tracked, and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(tree, args, timeout):
    """(passed, exit code, the output's tail); a run past `timeout` counts as failed (code None)."""
    # -n 0: no xdist workers (pyproject.toml adds two) for a selection from one file
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *args]
    with subprocess.Popen(command, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            output = proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:  # a mutated loop may never end: stop the tests and what they started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, None, f"timed out after {timeout} s"
    return proc.returncode == 0, proc.returncode, output[-1500:]


def run_mutation(tree, mutation, timeout):
    """'killed', 'SURVIVED', 'stale' or 'no tests', and a line of detail."""
    name, file, text, mutated, args = mutation
    path = tree / file
    original = path.read_text()
    if original.count(text) != 1:
        return "stale", f"{file} holds the text {original.count(text)} times, not once: {text!r}"
    path.write_text(original.replace(text, mutated))
    try:
        passed, code, tail = run_tests(tree, args, timeout)
    finally:
        path.write_text(original)
    if passed:
        return "SURVIVED", f"pytest {shlex.join(args)} passed"
    if code == 5:
        return "no tests", f"pytest {shlex.join(args)} selected no test"
    failures = [line for line in tail.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "killed", failures[0] if failures else f"exit {code}: {tail[-300:]}"


def selected(only):
    if not only:
        return list(enumerate(MUTATIONS, 1))
    chosen = [(i, m) for i, m in enumerate(MUTATIONS, 1) if str(i) in only or m[0] in only]
    unknown = set(only) - {str(i) for i, _ in chosen} - {m[0] for _, m in chosen}
    if unknown:
        raise SystemExit(f"--only {sorted(unknown)}: no such mutation; `--list` shows their numbers and names")
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", action="append", default=[], metavar="N|NAME", help="run this mutation (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run before it counts as failed")
    args = parser.parse_args()
    todo = selected(args.only)
    if args.list:
        for i, (name, file, text, mutated, tests) in todo:
            stale = "" if (REPO / file).read_text().count(text) == 1 else " (STALE: the text is not in the file once)"
            print(f"{i:>2}. {name}{stale}: {file}: {text!r} -> {mutated!r}\n    pytest {shlex.join(tests)}")
        return
    failed = False
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        print(f"copy of {REPO} in {tree}", flush=True)
        if not args.no_baseline:
            for tests in dict.fromkeys(tuple(m[4]) for _, m in todo):
                passed, code, tail = run_tests(tree, tests, args.timeout)
                print(f"baseline: pytest {shlex.join(tests)}: {'passed' if passed else 'FAILED'}", flush=True)
                if not passed:
                    print(tail)
                    failed = True
            if failed:
                raise SystemExit("a baseline failed: fix the tests before reading mutations against them")
        for i, mutation in todo:
            t0 = time.time()
            outcome, detail = run_mutation(tree, mutation, args.timeout)
            failed |= outcome != "killed"
            print(f"{i:>2}. {outcome:<8} {mutation[0]} ({time.time() - t0:.0f} s): {detail}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
