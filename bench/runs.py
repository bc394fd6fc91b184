"""Run train.py as a subprocess, some of its constants edited, and read its summary block: the machinery that the
bench scripts and the end-to-end tests share.
"""
import argparse
import os
import re
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


def edit_constants(source, edits):
    """train.py's source with every `NAME = ...` line (at any indentation, so both profile branches) set to
    edits[NAME], a Python expression as text; an edit that names no constant is an error."""
    for name, value in edits.items():
        source, count = re.subn(rf"^(\s*){name} = [^#\n]*?(\s*#.*)?$", rf"\g<1>{name} = {value}\g<2>", source,
                                flags=re.M)
        if not count:
            raise ValueError(f"train.py has no constant {name}")
    return source


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
        result = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
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
