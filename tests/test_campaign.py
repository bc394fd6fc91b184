"""campaign.py runs a plan the way program.md says: checked on a throwaway clone of this repository whose train.py
is tiny and trains for a few seconds (AUTORESEARCH_TIME_BUDGET), against rows and decisions recomputed here.

The baseline's embeddings and block matrices learn nothing (their learning rates 0), so an experiment that turns
one of them back on gains about 0.4 in val_bpb, far beyond the σ given (0.05, 3σ = 0.15; two seeds differ by about
0.03 here), and is kept; two such experiments give a combined run. Two experiments crash at start-up, so the plan
costs four runs of training: discards are checked with scripted runs below. Checks: the rows, their ids
and statuses; a crashing experiment logged as `crash` with 0.000000; each keep/discard recomputed from the rows by
program.md's rule; the combined run; analysis.ipynb reading the result; Ctrl-C in the middle, then a resume with 2
workers: no row twice, no experiment run twice, a clean tree; bad plans stopped with one line before anything runs.

Run: uv run pytest tests/test_campaign.py
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import campaign
import harness
import test_analysis
import harness
import hub_helpers

REPO = Path(__file__).resolve().parent.parent
TINY = dict(DEPTH="1", ASPECT_RATIO="32", HEAD_DIM="32", TOTAL_BATCH_SIZE="2**11", DEVICE_BATCH_SIZE="8")
FROZEN = dict(MATRIX_LR="0.0", EMBEDDING_LR="0.0")
SIGMA = 0.05
PLAN = """
[campaign]
name = "tiny"

[[experiment]]
id = "MAT-LR"
description = "matrix lr back on"
edits = { MATRIX_LR = 0.04 }

[[experiment]]
id = "BROKEN"
description = "an optimizer that does not exist"
edits = { MATRIX_OPTIMIZER = "nonsense" }

[[experiment]]
id = "EMB-LR"
description = "embedding lr back on"
edits = { EMBEDDING_LR = 0.6 }

[[experiment]]
id = "BAD-WINDOW"
description = "a window pattern of unknown letters"
edits = { WINDOW_PATTERN = "X" }
"""


def make_repo(tmp_path):
    """A clone of this repository's files, train.py tiny with frozen embeddings and blocks, committed; the plan
    beside it, outside the repository."""
    repo = tmp_path / "repo"
    repo.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((REPO / name).read_bytes())
    train = repo / "train.py"
    train.write_text(harness.edit_constants(train.read_text(), {**TINY, **FROZEN}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (tmp_path / "plan.toml").write_text(PLAN)
    return repo


def env_for(cache):
    return {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_TIME_BUDGET": "3",
            "AUTORESEARCH_PROFILE": "cpu", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def start(repo, cache, *args):
    return subprocess.Popen([sys.executable, "campaign.py", *args], cwd=repo, env=env_for(cache), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_rows(repo):
    lines = (repo / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert all(line.count("\t") == 4 for line in lines[1:]), lines
    return [dict(zip(("commit", "val_bpb", "memory_gb", "status", "description"), line.split("\t")))
            for line in lines[1:]]


def train_of(repo, commit):
    return subprocess.run(["git", "show", f"{commit}:train.py"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


def expected_decisions(rows, sigma):
    """program.md's rule applied to the rows, independently of campaign.py: {id: status}."""
    best = float(next(r["val_bpb"] for r in rows if r["description"] == "baseline"))
    by_id = {}
    for r in rows:
        by_id.setdefault(r["description"].split()[0], []).append(r)
    decisions = {}
    for eid, group in by_id.items():
        if eid == "baseline":
            continue
        first = group[0]
        if first["status"] == "crash":
            decisions[eid] = "crash"
            continue
        gain = round((best - float(first["val_bpb"])) * 1e6)  # in millionths: the rows' six decimals
        if gain <= 0:
            decisions[eid] = "discard"
        elif gain > round(3 * sigma * 1e6):
            decisions[eid] = "keep"
        else:
            assert first["description"].endswith("(within noise)") and first["status"] == "discard"
            mean = (float(first["val_bpb"]) + float(group[1]["val_bpb"])) / 2
            decisions[eid] = "keep" if round((best - mean) * 1e6) > round(2 * sigma * 1e6) else "discard"
    return decisions


@pytest.fixture(scope="module")
def finished(small_cache, tmp_path_factory):
    """A campaign interrupted with Ctrl-C as its first experiment starts, then resumed with 4 workers (all four
    experiments at once: the fewest rounds of runs)."""
    repo = make_repo(tmp_path_factory.mktemp("campaign"))
    proc = start(repo, small_cache, "../plan.toml", "--sigma", str(SIGMA))
    deadline = time.time() + 300
    while time.time() < deadline and not (repo / ".campaign" / "tiny" / "MAT-LR.log").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # MAT-LR's train.py has just started
    first_output = proc.communicate(timeout=60)[0]
    rows_at_interrupt = read_rows(repo)
    interrupted_at = time.time()
    result = subprocess.run([sys.executable, "campaign.py", "../plan.toml", "--sigma", str(SIGMA), "--workers", "4"],
                            cwd=repo, env=env_for(small_cache), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo, proc.returncode, first_output, rows_at_interrupt, interrupted_at


def test_interrupt_then_resume_runs_nothing_twice(finished):
    repo, code, output, rows_at_interrupt, interrupted_at = finished
    assert code == 130 and "run the same command again to resume" in output
    assert [r["description"] for r in rows_at_interrupt] == ["baseline"]
    rows = read_rows(repo)
    assert rows[:len(rows_at_interrupt)] == rows_at_interrupt  # the resume appended, rewrote nothing
    keys = [(r["commit"], r["description"]) for r in rows]
    assert len(keys) == len(set(keys))
    for r in rows_at_interrupt:  # what had its row before Ctrl-C did not run again: its log is older
        name = r["description"].split()[0] + ("-rerun" if "(re-run" in r["description"] else "")
        assert (repo / ".campaign" / "tiny" / f"{name}.log").stat().st_mtime < interrupted_at, name
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    assert not list((repo / ".campaign" / "tiny").glob("worktree-*"))  # removed at the end
    assert "worktree" not in subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True,
                                            text=True).stdout.split("\n", 1)[1]
    leftover = subprocess.run(["pgrep", "-f", str(repo / ".campaign")], capture_output=True, text=True).stdout
    assert leftover == ""  # no train.py left running


def test_rows_ids_statuses_and_commits(finished):
    repo, *_ = finished
    rows = read_rows(repo)
    assert rows[0]["description"] == "baseline" and rows[0]["status"] == "keep"
    base = subprocess.run(["git", "rev-parse", "refs/campaigns/tiny/baseline"], cwd=repo, capture_output=True,
                          text=True).stdout.strip()
    assert base == subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert base.startswith(rows[0]["commit"])
    ids = ["MAT-LR", "BROKEN", "EMB-LR", "BAD-WINDOW"]
    assert {r["description"].split()[0] for r in rows} == {"baseline", "combined", *ids}
    base_source = train_of(repo, base)
    for eid, edit in (("MAT-LR", {"MATRIX_LR": "0.04"}), ("EMB-LR", {"EMBEDDING_LR": "0.6"}),
                      ("BAD-WINDOW", {"WINDOW_PATTERN": "'X'"}), ("BROKEN", {"MATRIX_OPTIMIZER": "'nonsense'"})):
        commits = {r["commit"] for r in rows
                   if r["description"].split()[0] == eid and "(re-run" not in r["description"]}
        assert len(commits) == 1, eid  # one commit per experiment (a re-run has its own, with the next SEED)
        commit = commits.pop()
        # each experiment is the baseline plus its own edit only, in the profile branch that ran (cpu)
        assert train_of(repo, commit) == harness.edit_constants(base_source, edit, "cpu"), eid
        parent = subprocess.run(["git", "rev-parse", f"{commit}^"], cwd=repo, capture_output=True, text=True)
        assert parent.stdout.strip() == base
    crash = [r for r in rows if r["description"].startswith("BROKEN")]
    assert len(crash) == 1 and crash[0]["status"] == "crash"
    assert (crash[0]["val_bpb"], crash[0]["memory_gb"]) == ("0.000000", "0.0")
    assert "nonsense" in crash[0]["description"]  # the reason, from the run's last line
    for r in rows:
        if r["status"] != "crash":
            assert re.fullmatch(r"\d+\.\d{6}", r["val_bpb"]) and re.fullmatch(r"\d+\.\d", r["memory_gb"])


def test_decisions_follow_the_noise_rule(finished):
    repo, *_ = finished
    rows = read_rows(repo)
    final = {}
    for r in rows:
        if not r["description"].endswith("(within noise)"):
            final[r["description"].split()[0]] = r["status"]
    expected = expected_decisions([r for r in rows if not r["description"].startswith("combined")], SIGMA)
    assert {k: v for k, v in final.items() if k not in ("baseline", "combined")} == expected
    assert expected["MAT-LR"] == expected["EMB-LR"] == "keep"  # the plan's gains are far beyond σ
    assert expected["BAD-WINDOW"] == expected["BROKEN"] == "crash"
    for r in rows:  # the re-run row carries the mean of the two runs
        mean = re.search(r"\(re-run; mean ([0-9.]+)\)$", r["description"])
        if mean:
            pair = [float(x["val_bpb"]) for x in rows if x["description"].split()[0] == r["description"].split()[0]]
            assert float(mean.group(1)) == pytest.approx(statistics.mean(pair), abs=1e-6)


def test_combined_run_holds_every_kept_edit(finished):
    repo, *_ = finished
    rows = read_rows(repo)
    combined = [r for r in rows if r["description"].startswith("combined")]
    assert len(combined) >= 1 and "MAT-LR" in combined[0]["description"] and "EMB-LR" in combined[0]["description"]
    source = train_of(repo, combined[0]["commit"])
    base = train_of(repo, "refs/campaigns/tiny/baseline")
    assert source == harness.edit_constants(base, {"MATRIX_LR": "0.04", "EMBEDDING_LR": "0.6"}, "cpu")
    best = min((float(re.search(r"mean ([0-9.]+)\)$", r["description"]).group(1)) if "mean" in r["description"]
                else float(r["val_bpb"]), r["commit"]) for r in rows if r["status"] == "keep" and
               r["description"] != "baseline")
    branch = subprocess.run(["git", "rev-parse", "autoresearch/tiny"], cwd=repo, capture_output=True, text=True)
    assert branch.stdout.startswith(best[1])  # the branch ends at the best kept commit


def test_analysis_notebook_reads_the_campaign(finished, tmp_path):
    repo, *_ = finished
    text = (repo / "results.tsv").read_text()
    kernel = test_analysis.KernelManager(kernel_name="python3")
    kernel.start_kernel()
    try:
        printed, tables, png = test_analysis.execute(kernel, tmp_path, text)
    finally:
        kernel.shutdown_kernel(now=True)
    test_analysis.assert_review(text, printed, tables)
    test_analysis.assert_png(png)


@pytest.mark.parametrize("plan, message", [
    ('[campaign]\nname = "x"\n[[experiment]]\nid = "A"\nedits = { NO_SUCH_CONSTANT = 1 }\n',
     "experiment A: train.py has no constant NO_SUCH_CONSTANT"),
    ('[campaign]\nname = "x"\n[[experiment]]\nid = "A"\nedits = { DEPTH = 3 }\n'
     '[[experiment]]\nid = "A"\nedits = { DEPTH = 4 }\n', "experiment id 'A' is used twice"),
    ('[campaign]\nname = "x"\n[[experiment]\nid = "A"\n', "plan.toml is not valid TOML"),
    ('[campaign]\nname = "x"\n', "no experiments"),
    ('[campaign]\nname = "x"\n[[experiment]]\nid = "A"\nedits = { DEPTH = { a = 1 } }\n', "cannot be a constant"),
    ('[campaign]\nname = "x"\n[[experiment]]\nid = "A"\nedits = { DEPTH = 3 }\nedit = { DEPTH = 4 }\n',
     "unknown key(s) edit"),
])
def test_bad_plan_is_one_line_and_nothing_runs(tmp_path, plan, message):
    repo = make_repo(tmp_path)
    (tmp_path / "plan.toml").write_text(plan)
    result = subprocess.run([sys.executable, "campaign.py", "../plan.toml"], cwd=repo, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "AUTORESEARCH_PROFILE": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    assert not (repo / "results.tsv").exists() and not (repo / ".campaign").exists()
    refs = subprocess.run(["git", "for-each-ref"], cwd=repo, capture_output=True, text=True).stdout
    assert "autoresearch/" not in refs and "campaigns/" not in refs


def test_plan_values_become_python_literals():
    assert campaign.python_literal("adamw", "x") == "'adamw'"
    assert campaign.python_literal([1.0, 0.5], "x") == "(1.0, 0.5)" and campaign.python_literal([2], "x") == "(2,)"
    assert campaign.python_literal(True, "x") == "True" and campaign.python_literal(3e-4, "x") == "0.0003"
    with pytest.raises(SystemExit, match="not a finite number"):
        campaign.python_literal(float("nan"), "x")


def test_noise_rule_edges():
    assert campaign.screen(1.0, 1.0, 0.01) == "discard"     # equal is not a gain
    assert campaign.screen(1.0, 0.97, 0.01) == "rerun"      # 0.03 is not more than 3σ
    assert campaign.screen(1.0, 0.9699, 0.01) == "keep"
    assert campaign.rescreen(1.0, 0.975, 0.985, 0.01) == ("discard", 0.98)  # 0.02 is not more than 2σ
    assert campaign.rescreen(1.0, 0.975, 0.984, 0.01) == ("keep", 0.9795)


def test_sigma_comes_from_program_md_only_for_the_same_platform():
    program = (REPO / "program.md").read_text()
    row = next(line for line in program.splitlines() if line.startswith("| AMD EPYC, 2 threads |"))
    sigma = float(row.split("|")[6])
    label = ("AMD EPYC, 2 threads", "cpu", "fp32", "cpu", "stdlib")
    assert campaign.sigma_from_table(program, label) == sigma
    for i, other in enumerate(("AMD EPYC, 1 threads", "cuda", "bf16", "gpu", "climbmix")):
        assert campaign.sigma_from_table(program, label[:i] + (other,) + label[i + 1:]) is None


def test_muon_plan_is_the_plan_in_its_order():
    name, experiments = campaign.load_plan(REPO / "campaigns" / "muon-tuning.toml")
    ids = [e["id"] for e in experiments]
    assert ids[:6] == ["NS-1", "MM-5", "MM-1", "MM-3", "MB-2", "ABL-1"]
    assert sorted(ids) == sorted([f"MM-{i}" for i in range(1, 6)] + ["NS-1", "NS-2", "MB-1", "MB-2", "MB-3",
                                                                     "ABL-1", "ABL-2"])
    source = (REPO / "train.py").read_text()
    for path in (REPO / "campaigns").glob("*.toml"):
        for exp in campaign.load_plan(path)[1]:
            campaign.edited_source(source, exp, "cpu")  # every edit names a constant of train.py


def scripted_campaign(tmp_path, values):
    """A Campaign on a throwaway repository whose runs return the scripted val_bpb values in order (None: a crash)
    instead of training, so the rule's every branch is checked in seconds; everything else is the real code."""
    repo = make_repo(tmp_path)
    c = campaign.Campaign.__new__(campaign.Campaign)
    c.repo, c.tag, c.hub, c.profile = repo, "scripted", None, "cpu"
    c.results, c.dir = repo / "results.tsv", repo / ".campaign" / "scripted"
    c.baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    c.source = (repo / "train.py").read_text()
    script = iter(values)
    def run(commit, name):
        value = next(script)  # StopIteration: a run nobody expected
        return dict(summary={} if value is None else {"val_bpb": f"{value:.6f}", "peak_vram_mb": "2048.0"},
                    hardware="test CPU", crash=None if value is not None else "RuntimeError: boom")
    c.run = run
    exp = dict(id="X", description="an idea", edits={"SEED": "7"})
    exp["source"] = campaign.edited_source(c.source, exp, "cpu")
    return c, exp


@pytest.mark.parametrize("first, second, status, last", [
    (0.985, 0.975, "discard", "X an idea (re-run)"),                  # M 0.98: a gain of exactly 2σ is not enough
    (0.985, 0.970, "keep", "X an idea (re-run; mean 0.977500)"),
    (0.985, None, "crash", "X an idea (re-run; RuntimeError: boom)"),
])
def test_gain_within_noise_is_run_again_with_the_next_seed(tmp_path, first, second, status, last):
    """The re-run is the experiment's commit plus SEED one higher (8 after the experiment's 7), committed on top:
    on a CPU the same commit would give nearly the same val_bpb."""
    c, exp = scripted_campaign(tmp_path, [first, second])
    outcome = c.experiment(exp, 1.0, 0.01)
    rows = read_rows(c.repo)
    assert [(r["status"], r["description"]) for r in rows] == [("discard", "X an idea (within noise)"), (status, last)]
    assert outcome[2].startswith(rows[1]["commit"])
    assert train_of(c.repo, rows[1]["commit"]) == harness.edit_constants(exp["source"], {"SEED": "8"})
    parent = subprocess.run(["git", "rev-parse", f"{rows[1]['commit']}^"], cwd=c.repo, capture_output=True, text=True)
    assert parent.stdout.startswith(rows[0]["commit"]) and rows[0]["commit"] != rows[1]["commit"]
    assert rows[0]["val_bpb"] == f"{first:.6f}" and rows[0]["memory_gb"] == "2.0"
    assert outcome[0] == status
    assert c.experiment(exp, 1.0, 0.01)[:2] == outcome[:2]  # resumed: decided from the rows, nothing runs


def test_resume_after_the_within_noise_row_runs_only_the_re_run(tmp_path):
    c, exp = scripted_campaign(tmp_path, [0.985])  # one run left to do: the re-run
    commit = campaign.commit_edit(c.repo, c.tag, exp["id"], c.baseline, exp["source"], "X")
    campaign.append_row(c.results, commit, dict(summary={"val_bpb": "0.990000", "peak_vram_mb": "1024"}, crash=None),
                        "discard", "X an idea (within noise)")  # the first run's row, then Ctrl-C
    assert c.experiment(exp, 1.0, 0.005)[:2] == ("keep", 0.9875)  # M = (0.990 + 0.985) / 2 beats 1.0 by > 2σ
    assert read_rows(c.repo)[-1]["description"] == "X an idea (re-run; mean 0.987500)"


def test_hub_gets_every_row_and_each_kept_commit(tmp_path):
    """--hub: every row posted in program-hub.md's format, the kept commit pushed (so it ranks), the discard not."""
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    c, exp = scripted_campaign(tmp_path, [0.9, 1.2])  # a keep, then a discard
    server = hub_helpers.HubServer(hub_dir / "data", "--baseline-from", str(c.repo)).start()
    try:
        c.baseline = campaign.find_baseline(c.repo, c.tag, orphan=True)[0]
        subprocess.run(["git", "update-ref", f"refs/campaigns/{c.tag}/baseline", c.baseline], cwd=c.repo, check=True)
        c.hub = campaign.Hub(server.url, c.repo)
        summary = {"val_bpb": "1.000000", "peak_vram_mb": "1024", "dataset": "stdlib-py3.11.7-0badcafe",
                   "profile": "cpu"}
        c.log(c.baseline, dict(summary=summary, hardware="test CPU", crash=None), "keep", "baseline")
        kept = c.experiment(exp, 1.0, 0.01)[2]
        other = dict(exp, id="Y", edits={"SEED": "8"})
        other["source"] = campaign.edited_source(c.source, other, "cpu")
        c.experiment(other, 1.0, 0.01)
        agent = hub_helpers.Agent(server, c.hub.agent, c.hub.key)
        posts = [p["content"] for p in agent.get("/api/channels/results/posts").json()]
        assert sorted(posts) == sorted(
            f"commit:{r['commit']} platform:test-CPU val_bpb:{r['val_bpb']} vram_gb:{r['memory_gb']} "
            f"dataset:stdlib-py3.11.7-0badcafe profile:cpu | {dict(discard='DISCARD: ').get(r['status'], '')}"
            f"{r['description']}" for r in read_rows(c.repo))
        table = agent.get("/api/results?platform=test-CPU&dataset=stdlib-py3.11.7-0badcafe&profile=cpu").json()
        best = table[0]
        assert kept.startswith(best["commit"][:7]) and best["val_bpb"] == 0.9 and best.get("verified") is True
        pushed = {x["hash"] for x in agent.get("/api/git/commits").json()}
        assert kept in pushed and c.baseline in pushed and len(pushed) == 2  # the discard is never pushed
    finally:
        server.stop()


def profile_constants(source, profile):
    """The per-profile constants as train.py's `if PROFILE == ...` chain sets them for `profile`, by running it."""
    start = source.index('if PROFILE == "gpu":')
    chain = source[start:source.index("# ----", start)]
    scope = {"PROFILE": profile}
    exec(chain, scope)
    return {k: v for k, v in scope.items() if k.isupper() and k != "PROFILE"}


def test_a_per_profile_edit_changes_only_the_branch_that_runs():
    source = (REPO / "train.py").read_text()
    for profile in ("gpu", "cpu-bf16", "cpu"):
        exp = dict(id="D", edits={"DEPTH": "11", "WINDOW_PATTERN": "'SL'"})
        edited = campaign.edited_source(source, exp, profile)
        for other in ("gpu", "cpu-bf16", "cpu"):
            expected = profile_constants(source, other)
            if other == profile:
                expected.update(DEPTH=11, WINDOW_PATTERN="SL")
            assert profile_constants(edited, other) == expected, (profile, other)


def test_sigma_is_measured_as_program_md_says_when_its_table_has_no_row(tmp_path):
    c, _ = scripted_campaign(tmp_path, [1.02, 0.99])  # the re-runs with SEEDs 43 and 44
    c.sigma_given, c.workers = None, 1
    sigma, why = c.sigma(1.0, ("a CPU nobody measured", "cpu", "fp32", "cpu", "stdlib"))
    assert sigma == pytest.approx(statistics.stdev([1.0, 1.02, 0.99])) and "measured" in why
    rows = read_rows(c.repo)
    assert [(r["status"], r["description"]) for r in rows] == [("discard", "baseline re-run (SEED 43)"),
                                                              ("discard", "baseline re-run (SEED 44)")]
    for r, seed in zip(rows, (43, 44)):  # each re-run is the baseline with only SEED changed
        assert train_of(c.repo, r["commit"]) == harness.edit_constants(c.source, {"SEED": str(seed)}, "cpu")
    assert c.sigma(1.0, ("a CPU nobody measured", "cpu", "fp32", "cpu", "stdlib"))[0] == sigma  # resumed: no run
    table = c.sigma(1.0, ("AMD EPYC, 2 threads", "cpu", "fp32", "cpu", "stdlib"))
    assert table[1].startswith("program.md's table") and table[0] == campaign.sigma_from_table(
        (REPO / "program.md").read_text(), ("AMD EPYC, 2 threads", "cpu", "fp32", "cpu", "stdlib"))
    # two CPU workers give each run 1 thread, another label: the table's 2-thread row does not apply
    assert c.sigma(1.0, ("AMD EPYC, 1 threads", "cpu", "fp32", "cpu", "stdlib"))[0] == sigma
