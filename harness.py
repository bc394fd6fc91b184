"""
Read-only machinery that campaign.py, launch.py, the bench scripts and the tests share: running train.py with some
constants edited and reading its summary block, results.tsv, git and its worktrees, stopping a process group,
starting a local hub, and the command-line checks. The agent never edits it.
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
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent
SUMMARY_LINE = re.compile(r"^(\w+):\s+(\S+)$")
HUB_WAIT_SECONDS = 30  # for a hub to answer /api/health

# ---------------------------------------------------------------------------
# train.py: its constants edited, its summary block read
# ---------------------------------------------------------------------------

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


def read_results(path):
    """(header, rows) of a results.tsv: its first line, and each non-blank line below it split at its tabs (program.md's
    five columns: commit, val_bpb, memory_gb, status, description; a mistyped row has more or fewer); (None, [])
    before the file exists."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None, []
    return (lines[0] if lines else None), [line.split("\t") for line in lines[1:] if line.strip()]

# ---------------------------------------------------------------------------
# Git and its worktrees
# ---------------------------------------------------------------------------

class GitError(RuntimeError):
    """git refused: the message names the command and git's own last line, for the caller's one-line exit."""


def git(*args, cwd=None, input=None, env=None):
    """git's output, stripped; `env` adds to the environment. A failure raises GitError."""
    result = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise GitError(f"git {' '.join(args[:3])}: {lines[-1]}")  # the first words only: not a commit message
    return result.stdout.strip()


def ref_commit(repo, ref):
    """The commit `ref` names in `repo`, or None when there is none."""
    result = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=repo,
                            capture_output=True, text=True)
    return result.stdout.strip() or None


def add_worktree(repo, path, commit="HEAD", branch=None):
    """A git worktree of `repo` at `path`: on `branch` (made at `commit` when it does not exist), or without one,
    detached at `commit`. A worktree of `repo` already at `path` is reused as it is, on whatever commit or branch
    its work has moved to, so that running again resumes; one whose folder was deleted is made again. True when
    it was made now. Raises GitError, with a line saying why, when `path` holds something else or git refuses."""
    path = path.resolve()
    if f"worktree {path}" in git("worktree", "list", "--porcelain", cwd=repo).splitlines() and path.exists():
        return False
    git("worktree", "prune", cwd=repo)  # forgets worktrees whose folder is gone, so their branches can be checked out
    if path.exists():
        raise GitError(f"{path} exists and is not a worktree of {repo}: move it away")
    if branch is None:
        where = ["--detach", str(path), commit]
    elif ref_commit(repo, f"refs/heads/{branch}"):
        where = [str(path), branch]
    else:
        where = ["-b", branch, str(path), commit]
    git("worktree", "add", "--quiet", *where, cwd=repo)
    return True

# ---------------------------------------------------------------------------
# Processes: stopping a group, a local hub
# ---------------------------------------------------------------------------

def stop(procs, grace):
    """SIGTERM to each process's group, SIGKILL to what is left of them after `grace` seconds."""
    def signal_group(proc, sig):
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:  # the whole group is gone
            return False

    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None or signal_group(p, 0) for p in procs):
        time.sleep(0.1)
    for proc in procs:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def start_hub(data, port, admin_key, log, baseline):
    """hub.py on 127.0.0.1:port with its data in `data`, registration closed by `admin_key`, its output appended to
    `log`, in a process group of its own; pushes may change only train.py from the files of the checkout
    `baseline`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "hub.py"), "--data", str(data), "--port", str(port),
                                 "--log-level", "warning", "--baseline-from", str(baseline)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                                env={**os.environ, "HUB_ADMIN_KEY": admin_key})


def wait_for_hub(url, hub=None, log=None):
    """Returns once `url` answers /api/health. Raises RuntimeError when `hub`, the process serving it, stops first
    (with the last line of its `log`), TimeoutError after HUB_WAIT_SECONDS."""
    deadline = time.monotonic() + HUB_WAIT_SECONDS
    while time.monotonic() < deadline:
        if hub and hub.poll() is not None:
            raise RuntimeError(f"the local hub stopped at start-up: {last_line(log)} (all of it in {log})")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no hub answers at {url}/api/health after {HUB_WAIT_SECONDS} s")


def last_line(path):
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"

# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

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


def slug(name):
    """A machine or device name as it appears in a results file name: AMD EPYC, 2 threads -> AMD-EPYC-2-threads."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
