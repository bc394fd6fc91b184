"""harness.py: the machinery campaign.py, launch.py, the bench scripts and the tests share.

Checked against hand-written inputs (constant edits, summary blocks, results.tsv rows, command-line values), against
git itself (worktrees made, reused and remade, on a branch for launch.py and detached for campaign.py; a refusal is
one GitError naming the command and git's line) and against /proc (a stopped group has no process left, even one
that ignores SIGTERM). harness.run_train stopping its run on SIGTERM is in tests/test_bench.py; the whole runs in
tests/test_campaign.py, tests/test_launch.py and tests/test_train_e2e.py.
Run: uv run pytest tests/test_harness.py   (a few seconds)
"""
import argparse
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import harness
from hub_helpers import commit_change, git, make_repo


def test_helpers_edit_constants_read_summaries_and_arguments():
    assert harness.slug("Intel(R) Xeon(R) Processor, 2 threads") == "Intel-R-Xeon-R-Processor-2-threads"
    source = "if a:\n    DEPTH = 8                # blocks\nelse:\n    DEPTH = 4\nDEPTHS = 1\n"
    assert harness.edit_constants(source, {"DEPTH": "2**3"}) == \
        "if a:\n    DEPTH = 2**3                # blocks\nelse:\n    DEPTH = 2**3\nDEPTHS = 1\n"
    with pytest.raises(ValueError, match="no constant WIDTH"):
        harness.edit_constants(source, {"WIDTH": "1"})
    output = "---\nval_bpb: 9\nstep 5\n---\nval_bpb:          1.25\nnum_steps: 12\nnot a pair here\n"
    assert harness.read_summary(output) == {"val_bpb": "1.25", "num_steps": "12"}
    assert harness.read_summary("crashed\n") == {}
    assert harness.parse_edits(["DEPTH=6", "WINDOW_PATTERN=\"L\""]) == {"DEPTH": "6", "WINDOW_PATTERN": '"L"'}
    for bad in ("DEPTH", "DEPTH=", "2x=1"):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            harness.parse_edits([bad])
    check = harness.at_least(2)
    assert check("2") == 2
    for bad in ("1", "x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            check(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        harness.at_least(0.1, float)("nan")


def test_results_are_read_as_written_mistyped_rows_included(tmp_path):
    results = tmp_path / "results.tsv"
    assert harness.read_results(results) == (None, [])
    results.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                       "a1b2c3d\t1.500000\t2.0\tkeep\tbaseline\n\n"
                       "e4f5a6b\t1.4\tkeep\n")  # a row an agent mistyped: two columns short
    assert harness.read_results(results) == ("commit\tval_bpb\tmemory_gb\tstatus\tdescription",
                                              [["a1b2c3d", "1.500000", "2.0", "keep", "baseline"],
                                               ["e4f5a6b", "1.4", "keep"]])


def test_add_worktree_on_a_branch_makes_reuses_and_remakes(tmp_path):
    repo = make_repo(tmp_path / "repo", "worktrees")
    path = tmp_path / "trees" / "one"
    assert harness.add_worktree(repo, path, branch="work/one") is True
    assert git(path, "branch", "--show-current") == "work/one"
    assert git(path, "rev-parse", "HEAD") == git(repo, "rev-parse", "main")
    (path / "train.py").write_text("lr = 2.0\n")  # work in progress survives a reuse
    git(path, "checkout", "--quiet", "-b", "moved-on")
    assert harness.add_worktree(repo, path, branch="work/one") is False
    assert (path / "train.py").read_text() == "lr = 2.0\n" and git(path, "branch", "--show-current") == "moved-on"
    subprocess.run(["rm", "-rf", str(path)], check=True)  # deleted by hand: made again, on its existing branch
    commit_change(repo, "lr = 3.0\n", "later upstream work")
    assert harness.add_worktree(repo, path, branch="moved-on") is True
    assert git(path, "branch", "--show-current") == "moved-on"
    (tmp_path / "trees" / "plain").mkdir()
    with pytest.raises(harness.GitError, match="plain exists and is not a worktree of"):
        harness.add_worktree(repo, tmp_path / "trees" / "plain", branch="work/plain")
    with pytest.raises(harness.GitError, match="git worktree add --quiet: .*'main' is already checked out"):
        harness.add_worktree(repo, tmp_path / "trees" / "two", branch="main")


def test_add_worktree_detached_at_a_commit_makes_no_branch(tmp_path):
    repo = make_repo(tmp_path / "repo", "detached")
    first = git(repo, "rev-parse", "HEAD")
    later = commit_change(repo, "lr = 3.0\n", "later upstream work")
    branches = git(repo, "branch", "--list")
    path = tmp_path / "trees" / "worker"
    assert harness.add_worktree(repo, path, first) is True
    assert git(path, "branch", "--show-current") == "" and git(path, "rev-parse", "HEAD") == first
    git(path, "checkout", "--detach", "--quiet", later)  # as campaign.py checks out each run's commit
    assert harness.add_worktree(repo, path, first) is False and git(path, "rev-parse", "HEAD") == later
    shutil.rmtree(path)
    assert harness.add_worktree(repo, path, first) is True and git(path, "rev-parse", "HEAD") == first
    assert git(repo, "branch", "--list") == branches
    with pytest.raises(harness.GitError, match="git worktree add --quiet: fatal: invalid reference: no-such-commit"):
        harness.add_worktree(repo, tmp_path / "trees" / "other", "no-such-commit")


def live_group(pgid):
    """The pids of process group `pgid` that are alive (not zombies), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_stop_leaves_nothing_of_a_group_that_ignores_sigterm():
    # the leader exits on SIGTERM; its child ignores it, as a stuck run's worker may
    proc = subprocess.Popen(["sh", "-c", "(trap '' TERM; sleep 300) & sleep 300"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(live_group(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(live_group(proc.pid)) >= 2  # the leader and the subshell's sleep
    t0 = time.monotonic()
    harness.stop([proc], 1)
    assert time.monotonic() - t0 >= 1  # the ignored SIGTERM left something: SIGKILL only after the grace
    deadline = time.monotonic() + 10
    while live_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group(proc.pid) == [] and proc.returncode is not None
