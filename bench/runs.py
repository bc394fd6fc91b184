"""Run train.py as a subprocess, some of its constants edited, and read its summary block: the machinery that the
bench scripts and the end-to-end tests share.
"""
import argparse
import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY_LINE = re.compile(r"^(\w+):\s+(\S+)$")


def slug(name):
    """A machine or device name as it appears in a results file name: AMD EPYC, 2 threads -> AMD-EPYC-2-threads."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def edit_constants(source, edits, profile=None):
    """train.py's source with every `NAME = ...` line (at any indentation) set to edits[NAME], a Python expression
    as text; with `profile`, only the lines that profile runs: not those of the other branches of an
    `if PROFILE == "..."` chain. An edit that names no such constant is an error."""
    skip = other_profiles_lines(source, profile) if profile else set()
    lines = source.splitlines(keepends=True)
    for name, value in edits.items():
        pattern = re.compile(rf"^(\s*){name} = [^#\n]*?(\s*#.*)?(\n?)$")
        count = 0
        for i, line in enumerate(lines):
            if i not in skip and pattern.match(line):
                lines[i] = pattern.sub(rf"\g<1>{name} = {value}\g<2>\g<3>", line)
                count += 1
        if not count:
            raise ValueError(f"train.py has no constant {name}" + (f" for profile {profile}" if profile else ""))
    return "".join(lines)


def other_profiles_lines(source, profile):
    """Indices of the lines inside the branches of top-level `if PROFILE == "..."` chains that `profile` skips."""
    def is_profile_test(test):
        return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "PROFILE"
                and isinstance(test.ops[0], ast.Eq) and isinstance(test.comparators[0], ast.Constant))
    def lines_of(body):
        return range(body[0].lineno - 1, body[-1].end_lineno)
    skipped = set()
    for node in ast.parse(source).body:
        taken = False
        while isinstance(node, ast.If) and is_profile_test(node.test):
            here = not taken and node.test.comparators[0].value == profile
            taken = taken or here
            if not here:
                skipped.update(lines_of(node.body))
            if len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If) and is_profile_test(node.orelse[0].test):
                node = node.orelse[0]
                continue
            if node.orelse and taken:
                skipped.update(lines_of(node.orelse))
            break
    return skipped


def read_summary(output):
    """The key: value lines after the last `---` line of a run's output, in order; {} when there is none."""
    lines = output.splitlines()
    if "---" not in lines:
        return {}
    start = len(lines) - lines[::-1].index("---")
    pairs = (SUMMARY_LINE.match(line) for line in lines[start:])
    return {m.group(1): m.group(2) for m in pairs if m}


def run_train(edits=None, env=None, timeout=900, log=None):
    """Run a copy of train.py with `edits` applied, from the repository root; returns (summary, output, wall
    seconds). `env` adds to the environment; `log`, a path, receives the whole output."""
    source = edit_constants((REPO / "train.py").read_text(), edits or {})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.py"
        path.write_text(source)
        t0 = time.time()
        # SIGTERM raises here as Ctrl-C does, so subprocess.run kills the run instead of leaving it orphaned
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            result = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True,
                                    timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        finally:
            signal.signal(signal.SIGTERM, previous)
    output = result.stdout + result.stderr
    if log:
        Path(log).write_text(output)
    return read_summary(result.stdout), output, time.time() - t0


def at_least(low, kind=int):
    """An argparse type: a number of `kind` no smaller than `low`, else one line saying so."""
    def check(text):
        value = kind(text)
        if not value >= low:  # `not >=` also refuses nan
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value
    check.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return check


def parse_edits(pairs):
    """NAME=VALUE strings from the command line, as a dict."""
    edits = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier() or not value:
            raise SystemExit(f"--edit {pair!r}: write NAME=VALUE with VALUE a Python expression, e.g. DEPTH=6")
        edits[name] = value
    return edits
