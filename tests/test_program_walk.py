"""program.md followed literally: its bash blocks, run as written, drive one night in miniature.

A stand-in checkout (this tree's train.py with a tiny model, prepare.py, .gitignore and program.md, committed by a
"human" on a branch other than main, with no git identity for the agent) runs the setup blocks, then the loop: the
baseline, a kept change, a crash fixed by `git commit --amend` whose run is then discarded, and a crash given up
on. `uv` is a stand-in that runs this interpreter with a 1-second budget and torch.compile off; the data is a
tiny --from corpus in a temporary cache. Checked against what program.md promises and against git itself:
results.tsv row by row (each run's summary, the hash git gives after the amend), the branch's history, a clean
tree, and the summary block printed exactly, keys as program.md lists them. Plus the sigma block against
statistics.stdev.

Run: uv run pytest tests/test_program_walk.py   (40-50 s on 2 cores: 5 processes import torch)
"""
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parent.parent

# a tiny model whose unembedding learns nothing (its outputs stay near uniform): the kept change (its lr back on)
# beats it far beyond noise
TINY = dict(DEPTH="1", ASPECT_RATIO="32", HEAD_DIM="32", TOTAL_BATCH_SIZE="2**11", DEVICE_BATCH_SIZE="8",
            UNEMBEDDING_LR="0.0")
PLACEHOLDER = re.compile(r"<[a-z][a-z ]*>")
HUMAN = ["-c", "user.name=human", "-c", "user.email=human@example.com"]
# stands in for `uv run train.py` and `uv run python ...`: this interpreter, a 1 s budget, eager (compiling costs
# tens of seconds a run; test_train_e2e.py covers it). A real run must arrive without the inherited budget.
UV = """#!/bin/sh
[ "$1" = run ] || { echo "uv stand-in: only 'uv run'" >&2; exit 2; }
shift
if [ "$1" = train.py ] && [ -n "${AUTORESEARCH_TIME_BUDGET+set}" ]; then
  echo "uv stand-in: AUTORESEARCH_TIME_BUDGET reached a real run" >&2; exit 3
fi
[ "$1" = python ] && shift
AUTORESEARCH_TIME_BUDGET=1 TORCH_COMPILE_DISABLE=1 exec "%s" "$@"
"""


def doc_blocks() -> dict[str, str]:
    """program.md's bash blocks by their first-line comment, e.g. 'run' for `# run`."""
    text = (REPO / "program.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.M | re.S)]
    return {b.split("\n", 1)[0].lstrip("# ").strip(): b for b in blocks}


def doc_summary_keys() -> list[str]:
    """The summary keys in the order program.md lists them (its plain block that starts with ---)."""
    block = re.search(r"^```\n---\n(.*?)^```", (REPO / "program.md").read_text(), re.M | re.S).group(1)
    return [line.split(":")[0] for line in block.splitlines()]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def tiny_corpus(path: Path) -> Path:
    """300 documents of random words: a vocabulary of a few hundred tokens, a validation split of a dozen rows."""
    words = "the of and to in is was for on that with as by at from def return class import self None".split()
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(300):
            text = f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


class Agent:
    """One literal-minded agent in a stand-in checkout: each block runs as one bash command, as a tool call."""

    def __init__(self, tmp: Path):
        self.repo, home, bin_dir = tmp / "repo", tmp / "home", tmp / "bin"
        for folder in (self.repo, home, bin_dir):
            folder.mkdir()
        (bin_dir / "uv").write_text(UV % sys.executable)
        (bin_dir / "uv").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "AUTORESEARCH_"))}
        self.env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        AUTORESEARCH_CACHE=str(tmp / "cache"), AUTORESEARCH_PROFILE="cpu", CUDA_VISIBLE_DEVICES="",
                        AUTORESEARCH_TIME_BUDGET="7")  # a smoke test's variable, inherited
        self.blocks = doc_blocks()

    def run(self, name: str, check: bool = True, **values: str) -> str:
        """program.md's block `name` with its <placeholders> filled from values; its stdout and stderr."""
        script = self.blocks[name]
        for key, value in values.items():
            script = script.replace(f"<{key}>", value)
        assert not PLACEHOLDER.search(script), f"block {name!r} has a placeholder left: {script}"
        result = subprocess.run(["bash", "-c", script], cwd=self.repo, env=self.env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0 or not check, f"block {name!r}:\n{result.stdout}{result.stderr}"
        return result.stdout + result.stderr

    def edit(self, **constants: str) -> None:
        path = self.repo / "train.py"
        path.write_text(harness.edit_constants(path.read_text(), constants))

    def head(self) -> str:
        return git(self.repo, "rev-parse", "--short", "HEAD")


def human_checkout(agent: Agent, tmp: Path) -> str:
    """The human's repository: this tree's files on main, then a tiny model on a branch `tiny`, checked out, and
    a prepared tiny dataset. Returns the branch's head."""
    repo = agent.repo
    for name in ("train.py", "prepare.py", "runtime.py", ".gitignore", "program.md"):
        shutil.copy(REPO / name, repo / name)
    git(repo, "init", "--quiet", "-b", "main")
    git(repo, "add", ".")
    git(repo, *HUMAN, "commit", "--quiet", "-m", "the project")
    git(repo, "checkout", "--quiet", "-b", "tiny")
    agent.edit(**TINY)
    git(repo, *HUMAN, "commit", "--quiet", "-am", "a tiny model")
    prepared = subprocess.run([sys.executable, "prepare.py", "--from", str(tiny_corpus(tmp / "corpus.jsonl"))],
                              cwd=repo, env=agent.env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return git(repo, "rev-parse", "HEAD")


def finished(agent: Agent, keys: list[str]) -> dict[str, str]:
    """The `run` block for a run that must finish, then the `summary` block, which must print exactly the summary."""
    out = agent.run("run")
    assert "exit 0" in out and "time_budget:      1" in out, out
    summary = agent.run("summary").splitlines()
    assert summary[0] == "---" and len(summary) == len(keys) + 1, summary
    pairs = [re.fullmatch(r"(\w+):\s+(\S+)", line) for line in summary[1:]]
    assert all(pairs) and [m.group(1) for m in pairs] == keys, summary
    return {m.group(1): m.group(2) for m in pairs}


def row(commit: str, summary: dict | None, status: str, description: str) -> list[str]:
    """The results.tsv row program.md's table asks for; summary None for a crash."""
    if summary is None:
        return [commit, "0.000000", "0.0", status, description]
    return [commit, summary["val_bpb"], f"{float(summary['peak_vram_mb']) / 1024:.1f}", status, description]


def test_a_night_in_miniature_as_program_md_writes_it(tmp_path):
    agent = Agent(tmp_path)
    start = human_checkout(agent, tmp_path)
    keys = doc_summary_keys()
    repo = agent.repo

    # setup: identity, branch, platform, log
    assert "commits by autoresearch agent <autoresearch@localhost>" in agent.run("git identity")
    assert git(repo, "config", "--local", "user.name") == "autoresearch agent"
    agent.run("branch", tag="walk")
    assert git(repo, "branch", "--show-current") == "autoresearch/walk"
    assert git(repo, "rev-parse", "HEAD") == start != git(repo, "rev-parse", "main")
    platform = agent.run("platform")
    for line in ("device:    cpu (", "precision: fp32", "attention: sdpa", "profile:   cpu (", "dataset from-corpus-"):
        assert line in platform, platform
    assert "step 0" not in platform and "---" not in platform.splitlines()  # it trained nothing
    agent.run("start the log")
    expected = []

    # the baseline
    base = finished(agent, keys)
    agent.run("log", status="keep", description="baseline")
    expected.append(row(agent.head(), base, "keep", "baseline"))

    # a kept change: the unembedding learns
    agent.edit(UNEMBEDDING_LR="0.004")
    agent.run("commit", description="unembedding lr 0.004")
    kept = finished(agent, keys)
    assert float(kept["val_bpb"]) < float(base["val_bpb"]) - 0.05, (base, kept)  # far beyond 3 sigma
    agent.run("log", status="keep", description="unembedding lr 0.004")
    keep_commit = agent.head()
    expected.append(row(keep_commit, kept, "keep", "unembedding lr 0.004"))

    # a typo crashes; the fix is amended in, and the run that finishes is discarded
    agent.edit(UNEMBEDDING_LR="0.0)")
    agent.run("commit", description="freeze the unembedding")
    crashed_commit = agent.head()
    out = agent.run("run", check=False)  # grep finds no val_bpb: line
    assert "exit 1" in out and "val_bpb" not in out, out
    assert "SyntaxError" in subprocess.run(["bash", "-c", "tail -n 50 run.log"], cwd=repo, capture_output=True,
                                           text=True).stdout
    agent.edit(UNEMBEDDING_LR="0.0")
    agent.run("amend")
    amended_commit = agent.head()
    assert amended_commit != crashed_commit and git(repo, "rev-parse", "--short", "HEAD~1") == keep_commit
    frozen = finished(agent, keys)
    assert float(frozen["val_bpb"]) > float(kept["val_bpb"]), (kept, frozen)
    agent.run("log", status="discard", description="freeze the unembedding")
    expected.append(row(amended_commit, frozen, "discard", "freeze the unembedding"))
    agent.run("back to the last keep")
    assert agent.head() == keep_commit

    # a crash given up on: one row, then back like a discard
    agent.edit(DEPTH="1 +")
    agent.run("commit", description="one more block")
    gave_up = agent.head()
    assert "exit 1" in agent.run("run", check=False)
    agent.run("log", status="crash", description="one more block (a syntax error, 3 fixes failed)")
    expected.append(row(gave_up, None, "crash", "one more block (a syntax error, 3 fixes failed)"))
    agent.run("back to the last keep")

    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [line.split("\t") for line in lines[1:]] == expected
    assert crashed_commit not in (repo / "results.tsv").read_text()  # the crash fixed by amend left no row
    assert git(repo, "rev-parse", "--short", "HEAD") == keep_commit
    assert git(repo, "log", "--format=%s", f"{start}..HEAD").splitlines() == ["unembedding lr 0.004"]
    assert git(repo, "log", "-1", "--format=%an <%ae>") == "autoresearch agent <autoresearch@localhost>"
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""  # results.tsv and run.log ignored


def test_sigma_block_is_the_sample_std_of_the_baseline_rows(tmp_path):
    agent = Agent(tmp_path)
    baselines = [1.634217, 1.652904, 1.613388]
    rows = [["a1b2c3d", f"{v:.6f}", "0.9", "keep" if i == 0 else "discard",
             "baseline" if i == 0 else f"baseline re-run (SEED {42 + i})"] for i, v in enumerate(baselines)]
    rows.insert(1, ["e4f5a6b", "1.500000", "0.9", "discard", "a change that is not a baseline"])
    (agent.repo / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                            + "".join("\t".join(r) + "\n" for r in rows))
    assert float(agent.run("sigma")) == pytest.approx(statistics.stdev(baselines), abs=1e-6)
