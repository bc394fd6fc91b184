"""The hub's API: the agenthub loop as program-hub.md writes it, and every kind of bad input.

The real server (hub.py) runs as a subprocess on a free port of 127.0.0.1; agents are real git repositories in
temporary folders, driven by the bash blocks of program-hub.md exactly as written (curl included). Checked against
git itself: a fetched bundle must unbundle and check out in an unrelated repository, and bad pushes must leave the
index, the object store and the incoming folder as they were.
Run: uv run pytest tests/test_hub.py   (the helpers are in tests/hub_helpers.py)
"""
import hashlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from hub.core import Config, Hub, HubError
from hub_helpers import (JSON, HubServer, agent_of, bundle, commit_change, git, hub_state, log_row, make_repo,
                         needs_curl, run_blocks, run_log, stand_in_uv, write_run_log, written_since)

# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub") / "data", "--max-registrations-per-hour", "1000").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mallory(hub):
    agent = hub.register("mallory")
    assert agent.post("/api/channels", json={"name": "discussion", "description": "talk"}).status_code in (201, 409)
    return agent

# ---------------------------------------------------------------------------
# The loop, as program-hub.md writes it


def hub_sections(out: str) -> dict[str, list[str]]:
    """The read-the-hub block's output: the lines under each '== heading', by the heading's first word."""
    return {name.rstrip(","): body.splitlines() for name, body in re.findall(r"^== (\S+).*\n((?:.+\n)*)", out, re.M)}


@needs_curl
def test_two_agents_run_the_loop_from_program_hub(hub, tmp_path):
    repo_a, repo_b = make_repo(tmp_path / "a", "alpha"), make_repo(tmp_path / "b", "beta")
    home = tmp_path / "home"
    home.mkdir()

    # agent A: register, channels, an orphan baseline of the whole checkout, run, log, post, push
    address = run_blocks(hub, home, repo_a, ["the hub's address", "register once", "channels", "orphan baseline"],
                         AGENT_NAME="alpha")
    assert '"ok":true' in address and "agent alpha\n" in address
    assert git(repo_a, "rev-list", "--count", "HEAD") == "1"  # orphan: none of the upstream history
    assert git(repo_a, "ls-tree", "--name-only", "HEAD") == git(repo_a, "ls-tree", "--name-only", "main")
    uv = stand_in_uv(tmp_path)  # the run block runs train.py in the sandbox, and this stands in for its output
    (tmp_path / "run-a.log").write_text(run_log(1.1))
    assert "exit 0" in run_blocks(hub, home, repo_a, ["run"], FAKE_RUN_LOG=str(tmp_path / "run-a.log"), **uv)
    log_row(repo_a, "1.100000", "2.0", "keep", "baseline")
    assert git(repo_a, "status", "--porcelain") == ""  # run.log, results.tsv and .agenthub/ are ignored by rule
    out = run_blocks(hub, home, repo_a, ["register once", "read the result", "post the result", "push"],
                     PLATFORM="cpu-test")
    baseline = git(repo_a, "rev-parse", "HEAD")
    assert f'"added":["{baseline}"]' in out
    for dataset, profile in (("climbmix", "cpu"), ("stdlib", "cpu-bf16")):  # runs the table must keep apart
        write_run_log(repo_a, 0.9, dataset, profile)
        log_row(repo_a, "0.900000", "2.0", "discard", f"baseline on {dataset} {profile}")
        run_blocks(hub, home, repo_a, ["register once", "read the result", "post the result"], PLATFORM="cpu-test")

    # agent B, in an unrelated repository: fetch A's baseline by its 7-character hash, improve it, post, push
    short = baseline[:7]
    run_blocks(hub, home, repo_b, ["register once", "channels", "build on another commit"], AGENT_NAME="beta",
               HASH=short)
    assert git(repo_b, "rev-parse", "HEAD") == baseline
    improved = commit_change(repo_b, "lr = 0.5\n", "halve the learning rate")
    (tmp_path / "run-b.log").write_text(run_log(1.05))
    assert "exit 0" in run_blocks(hub, home, repo_b, ["run"], FAKE_RUN_LOG=str(tmp_path / "run-b.log"), **uv)
    log_row(repo_b, "1.050000", "2.0", "keep", "halve the learning rate")
    out = run_blocks(hub, home, repo_b,
                     ["register once", "read the result", "post the result", "push", "read the hub"],
                     PLATFORM="cpu-test")
    assert f'"added":["{improved}"]' in out
    seen = hub_sections(out)
    assert list(seen) == ["results", "#results", "#discussion", "leaves"]
    assert seen["results"] == [f"1.05 keep {improved[:7]} beta: halve the learning rate",
                               f"1.1 keep {short} alpha: baseline"]  # stdlib on cpu only
    assert any(line.endswith("| DISCARD: baseline on climbmix cpu") for line in seen["#results"])
    assert f"{improved[:7]} depth 1 beta: halve the learning rate" in seen["leaves"]

    beta = agent_of(hub, repo_b, home)
    assert [c["hash"] for c in beta.get(f"/api/git/commits/{short}/children").json()] == [improved]
    leaves = {c["hash"]: c for c in beta.get("/api/git/leaves").json()}
    assert improved in leaves and baseline not in leaves
    assert leaves[improved]["depth"] == 1 and leaves[improved]["parent_hash"] == baseline
    commit = beta.get(f"/api/git/commits/{improved[:9]}").json()
    assert commit["agent_id"] == "beta" and commit["message"] == "halve the learning rate"
    assert commit["parents"] == [baseline] and commit["author_time"].endswith("Z")
    assert commit["created_at"].endswith("Z")  # the push time
    diff = beta.get(f"/api/git/diff/{short}/{improved[:7]}")
    assert diff.status_code == 200 and "+lr = 0.5" in diff.text
    mine = beta.get("/api/git/commits", params={"agent": "beta", "limit": 5}).json()
    assert [c["hash"] for c in mine] == [improved]
    newest_first = [c["hash"] for c in beta.get("/api/git/commits", params={"limit": 500}).json()]
    assert newest_first.index(improved) < newest_first.index(baseline)
    assert len(beta.get("/api/git/commits", params={"limit": 1}).json()) == 1

    results = beta.get("/api/results", params={"platform": "cpu-test", "dataset": "stdlib", "profile": "cpu"}).json()
    assert [(r["val_bpb"], r["commit"], r["dataset"], r["profile"]) for r in results] == [
        (1.05, improved[:7], "stdlib", "cpu"), (1.1, short, "stdlib", "cpu")]
    assert results[0]["vram_gb"] == 2.0

    # pushing a known commit again is a no-op; A fetching B's work fast-forwards A's repository
    again = requests.post(hub.url + "/api/git/push", data=bundle(repo_b),
                          headers={"Authorization": beta.http.headers["Authorization"]})
    assert again.json() == {"added": []}
    run_blocks(hub, home, repo_a, ["register once", "build on another commit"], HASH=improved[:7])
    assert git(repo_a, "rev-parse", "HEAD") == improved
    assert "lr = 0.5" in (repo_a / "train.py").read_text()


@needs_curl
def test_crashes_and_a_discard_are_posted_as_program_md_logs_them(hub, tmp_path):
    repo, home = make_repo(tmp_path / "c", "gamma"), tmp_path / "home"
    home.mkdir()
    run_blocks(hub, home, repo, ["register once", "channels", "orphan baseline"], AGENT_NAME="gamma")
    post = ["register once", "read the result", "post the result"]

    # a crash fixed by amend: no row for the crash, and a row under the hash from before the amend is refused
    typo = commit_change(repo, "lr = 2.0,\n", "double the learning rate")
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("2.0,", "2.0"))
    git(repo, "commit", "--quiet", "--amend", "--no-edit", "-a")
    write_run_log(repo, 1.2)
    log_row(repo, "1.200000", "2.0", "keep", "double the learning rate", commit=typo)
    assert "not HEAD: log this run first" in run_blocks(hub, home, repo, post, PLATFORM="gamma-gpu")
    log_row(repo, "1.200000", "2.0", "keep", "double the learning rate")
    run_blocks(hub, home, repo, post, PLATFORM="gamma-gpu")
    amended = git(repo, "rev-parse", "--short", "HEAD")

    # crashes given up on: one out of memory after the start-up lines, one before them (prepare.py names the
    # dataset and profile then; `uv run python` is this interpreter, prepare.py a stand-in)
    wide = commit_change(repo, "width = 2\n", "double the width")
    write_run_log(repo, None)
    log_row(repo, "0.000000", "0.0", "crash", "double the width (out of memory)")
    run_blocks(hub, home, repo, post, PLATFORM="gamma-gpu")
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    lacking = commit_change(repo, "import flash_attn\n", "use flash_attn")
    (repo / "run.log").write_text("ModuleNotFoundError: No module named 'flash_attn'\n")
    (repo / "prepare.py").write_text("PROFILE = 'cpu-bf16'\ndef dataset_label(): return 'stdlib-py3.12.0-0badcafe'\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "uv").write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} "$@"\n')  # drops `run python`
    (tmp_path / "bin" / "uv").chmod(0o755)
    log_row(repo, "0.000000", "0.0", "crash", "use flash_attn (not installed)")
    run_blocks(hub, home, repo, post, PLATFORM="gamma-gpu", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")

    swiglu = commit_change(repo, "mlp = 'swiglu'\n", "swiglu")
    write_run_log(repo, 1.3)
    log_row(repo, "1.300000", "2.0", "discard", "swiglu")
    out = run_blocks(hub, home, repo, [*post, "discuss", "discuss"], check=False, PLATFORM="gamma-gpu",
                     MSG="**wider** is out of memory at 2 GB")
    assert out.count('"channel":"discussion"') == 1  # the block unsets MSG: running it again posts nothing
    gamma = agent_of(hub, repo, home)
    results = gamma.get("/api/results", params={"platform": "gamma-gpu"}).json()
    assert [(r["status"], r["val_bpb"], r["vram_gb"], r["commit"], r["dataset"], r["profile"], r["description"])
            for r in results] == [
        ("keep", 1.2, 2.0, amended, "stdlib", "cpu", "double the learning rate"),
        ("discard", 1.3, 2.0, swiglu[:7], "stdlib", "cpu", "DISCARD: swiglu"),
        ("crash", None, None, wide[:7], "stdlib", "cpu", "CRASH: double the width (out of memory)"),
        ("crash", None, None, lacking[:7], "stdlib-py3.12.0-0badcafe", "cpu-bf16",
         "CRASH: use flash_attn (not installed)")]
    posts = gamma.get("/api/channels/discussion/posts", params={"limit": 1}).json()
    assert posts[0]["content"] == "**wider** is out of memory at 2 GB" and posts[0]["agent_id"] == "gamma"

    # a #results post that does not parse stays a post and stays out of the table
    table = len(gamma.get("/api/results").json())
    note = gamma.post("/api/channels/results/posts", json={"content": "commit:abc1234 looked odd, re-running it"})
    assert note.status_code == 201
    assert gamma.get("/api/channels/results/posts", params={"limit": 1}).json()[0]["id"] == note.json()["id"]
    assert len(gamma.get("/api/results").json()) == table


@needs_curl
def test_a_taken_name_saves_no_key_and_the_default_name_is_unique(hub, mallory, tmp_path):
    repo, home = make_repo(tmp_path / "t", "taken"), tmp_path / "home"
    home.mkdir()
    out = run_blocks(hub, home, repo, ["register once"], check=False, AGENT_NAME="mallory")
    assert "is taken" in out and not (repo / ".agenthub" / "agent").exists() and not (home / ".config").exists()
    out = run_blocks(hub, home, repo, ["register once"])  # no AGENT_NAME: the host name and a random suffix
    name = agent_of(hub, repo, home).name
    assert re.fullmatch(re.escape(socket.gethostname().split(".")[0][:40]) + "-[0-9a-f]{6}", name)
    assert out == f"agent {name}\n"  # never the key
    assert run_blocks(hub, home, repo, ["register once"]) == out  # a restart keeps the name
    assert agent_of(hub, repo, home).get("/api/git/leaves").status_code == 200


@needs_curl
def test_two_agents_on_one_machine_keep_to_their_own_checkouts(hub, tmp_path):
    """Two worktrees of one clone, one HOME, one host name: setup and a loop at once. Each agent writes only in its
    own checkout (nothing in HOME, nothing of theirs directly in /tmp), under its own name, and both posts land."""
    home, clone = tmp_path / "home", make_repo(tmp_path / "clone", "shared")
    home.mkdir()
    repos = [tmp_path / "one", tmp_path / "two"]
    for repo in repos:
        git(clone, "worktree", "add", "--quiet", "--detach", str(repo))
    since = time.time_ns() - 10**9  # file times may lag the clock by a tick

    def at_once(names: list[str], **env: str) -> list[str]:
        with ThreadPoolExecutor(len(repos)) as pool:
            return list(pool.map(lambda repo: run_blocks(hub, home, repo, names, **env), repos))

    at_once(["the hub's address", "register once", "channels", "orphan baseline"])
    for i, repo in enumerate(repos):
        commit_change(repo, f"lr = 0.{i + 5}\n", f"learning rate 0.{i + 5}")
        write_run_log(repo, 1.0 + i / 100)
        log_row(repo, f"{1.0 + i / 100:.6f}", "2.0", "keep", f"learning rate 0.{i + 5}")
    outs = at_once(["register once", "read the result", "post the result", "push", "read the hub"],
                   PLATFORM="cpu-pair")

    agents, heads = [agent_of(hub, repo, home) for repo in repos], [git(repo, "rev-parse", "HEAD") for repo in repos]
    assert agents[0].name != agents[1].name and agents[0].key != agents[1].key
    results = agents[0].get("/api/results", params={"platform": "cpu-pair"}).json()
    assert [(r["agent_id"], r["commit"]) for r in results] == [(a.name, h[:7]) for a, h in zip(agents, heads)]
    assert set(heads) <= {c["hash"] for c in agents[0].get("/api/git/leaves").json()}
    for repo, head, out in zip(repos, heads, outs):
        assert head in out  # its push answer lists its commit
        assert sorted(p.name for p in (repo / ".agenthub").iterdir()) == ["agent", "post.json", "push.bundle"]
        assert head[:7] in (repo / ".agenthub" / "post.json").read_text()
        assert git(repo, "status", "--porcelain") == ""
    keys = home / ".config" / "autoresearch" / "hub-keys"  # the keys, outside the checkouts, and nothing else
    assert sorted(p for p in home.rglob("*") if p.is_file()) == sorted(keys / a.name for a in agents)
    assert {oct(p.stat().st_mode & 0o777) for p in [keys, *keys.iterdir()]} == {"0o700", "0o600"}
    marks = [h[:7] for h in heads] + [a.key for a in agents] + [a.name for a in agents]
    for shared in {Path("/tmp"), Path(tempfile.gettempdir())}:
        assert written_since(shared, since, marks) == []


def test_results_filter_by_platform_dataset_and_profile(hub, mallory):
    assert mallory.post("/api/channels", json={"name": "results", "description": ""}).status_code in (201, 409)
    runs = [("filter-a", "stdlib", "cpu", 1.5), ("filter-a", "climbmix", "cpu", 1.2),
            ("filter-a", "stdlib", "gpu", 1.0), ("filter-b", "stdlib", "cpu", 0.9)]
    for i, (platform, dataset, profile, val_bpb) in enumerate(runs):
        content = f"commit:abcd00{i} platform:{platform} val_bpb:{val_bpb} dataset:{dataset} profile:{profile} | {i}"
        assert mallory.post("/api/channels/results/posts", json={"content": content}).status_code == 201

    def table(**filters: str) -> list[float]:
        return [r["val_bpb"] for r in mallory.get("/api/results", params=filters).json()]

    assert table(platform="filter-a") == [1.0, 1.2, 1.5]
    assert table(platform="filter-a", dataset="stdlib") == [1.0, 1.5]
    assert table(platform="filter-a", profile="cpu") == [1.2, 1.5]
    assert table(platform="filter-a", dataset="stdlib", profile="cpu") == [1.5]
    assert table(platform="filter-a", dataset="wikitext") == []


def test_posts_page_back_with_before(hub, mallory):
    assert mallory.post("/api/channels", json={"name": "paging", "description": ""}).status_code == 201
    ids = [mallory.post("/api/channels/paging/posts", json={"content": f"post {i}"}).json()["id"] for i in range(5)]
    newest = mallory.get("/api/channels/paging/posts", params={"limit": 2}).json()
    assert [p["id"] for p in newest] == ids[:-3:-1]
    older = mallory.get("/api/channels/paging/posts", params={"limit": 2, "before": newest[-1]["id"]}).json()
    assert [p["id"] for p in older] == [ids[2], ids[1]]
    channels = {c["name"]: c for c in mallory.get("/api/channels").json()}
    assert channels["paging"]["post_count"] == 5
    assert mallory.post("/api/channels", json={"name": "paging", "description": ""}).status_code == 409

# ---------------------------------------------------------------------------
# Bad input: the right status, a message, and nothing stored


def test_bad_pushes_are_rejected_and_store_nothing(hub, mallory, tmp_path):
    repo = make_repo(tmp_path / "m", "mallory")
    commit_change(repo, "x = 1\n", "one")
    good = bundle(repo)
    before = hub_state(hub.data)
    unknown_parent = git(repo, "rev-parse", "HEAD~1")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    malformed = subprocess.run(  # a commit with no author email: a well-formed pack that fails the fsck checks
        ["git", "hash-object", "-t", "commit", "-w", "--literally", "--stdin"], cwd=repo, capture_output=True,
        text=True, check=True, input=f"tree {tree}\nauthor nobody 1700000000 +0000\n"
                                     "committer a <a@example.com> 1700000000 +0000\n\nbad\n").stdout.strip()
    git(repo, "update-ref", "refs/heads/malformed", malformed)
    cases = {
        "garbage": (b"this is not a bundle" * 50, 400, "not a git bundle"),
        "empty": (b"", 400, "empty body"),
        "truncated": (good[: len(good) // 2], 400, "truncated or invalid"),
        "header only": (good[: good.index(b"PACK")], 400, "no pack data"),
        "unknown prerequisite": (bundle(repo, "HEAD~1..HEAD"), 400, unknown_parent),
        "fails fsck": (bundle(repo, "malformed"), 400, "missingEmail"),
        "bad header line": (b"# v2 git bundle\nnot-a-hash HEAD\n\nPACK", 400, "bad line"),
        "partial clone filter": (b"# v3 git bundle\n@filter=blob:none\n" + good.split(b"\n", 1)[1], 400,
                                 "not supported"),
    }
    for name, (body, status, message) in cases.items():
        r = mallory.push(body)
        assert (r.status_code, message in r.json()["error"]) == (status, True), (name, r.text)
    assert hub_state(hub.data) == before


def test_bad_hashes_get_400_and_unknown_ones_404(hub, mallory):
    for bad in ("zzzzzzz", "abc12", "0" * 41, "..%2F..%2Fetc%2Fpasswd", "%2E%2E"):
        for path in (f"/api/git/fetch/{bad}", f"/api/git/commits/{bad}", f"/api/git/commits/{bad}/children",
                     f"/api/git/diff/{bad}/{bad}"):
            r = mallory.get(path)
            assert r.status_code == 400 and "error" in r.json(), (path, r.status_code, r.text)
    assert mallory.get("/api/git/fetch/" + "0" * 40).status_code == 404
    assert mallory.get("/api/git/commits/deadbeef").json() == {"error": "unknown commit deadbeef"}


def test_a_prefix_that_two_commits_share_is_ambiguous(tmp_path):
    hub = Hub(Config(tmp_path / "data"))
    with hub.store.transaction() as db:
        for sha in ("abcdef1" + "0" * 33, "abcdef1" + "1" * 33):
            db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                       "VALUES (?, '', '', '', 'a', '', 0)", (sha,))
    with pytest.raises(HubError) as e:
        hub.resolve("abcdef1")
    assert e.value.status == 400 and "ambiguous" in e.value.message
    assert hub.resolve("ABCDEF11") == "abcdef1" + "1" * 33


@needs_curl
def test_dot_dot_paths_never_reach_the_filesystem(hub, mallory):
    for path in ("/api/git/fetch/../../../etc/passwd", "/api/git/fetch/..%2f..%2fhub.db"):
        out = subprocess.run(["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}",
                              "-H", f"Authorization: Bearer {mallory.key}", hub.url + path],
                             capture_output=True, text=True, check=True).stdout
        assert out in ("400", "404"), (path, out)


def test_bad_json_keys_ids_and_channels(hub, mallory):
    before = hub_state(hub.data)
    url = hub.url
    checks = [
        (requests.post(url + "/api/register", data=b"{not json", headers=JSON), 400, "not valid JSON"),
        (requests.post(url + "/api/register", json=["alice"]), 400, "JSON object"),
        (requests.post(url + "/api/register", json={"name": "x"}), 400, "'id' is required"),
        (requests.post(url + "/api/register", json={"id": "../etc"}), 400, "agent id must be"),
        (requests.post(url + "/api/register", json={"id": "mallory"}), 409, "taken"),
        (requests.get(url + "/api/git/leaves"), 401, "missing API key"),
        (requests.get(url + "/api/git/leaves", headers={"Authorization": "Bearer nope"}), 401, "unknown API key"),
        (requests.get(url + "/api/git/leaves", headers={"Authorization": mallory.key}), 401, "missing API key"),
        (mallory.post("/api/channels/nowhere/posts", json={"content": "hi"}), 404, "unknown channel"),
        (mallory.get("/api/channels/nowhere/posts"), 404, "unknown channel"),
        (mallory.post("/api/channels", json={"name": "#results", "description": ""}), 400, "channel name"),
        (mallory.post("/api/channels", json={"name": "Bad Name"}), 400, "channel name"),
        (mallory.post("/api/channels", json={"name": "x" * 33}), 400, "channel name"),
        (mallory.post("/api/channels/discussion/posts", data=b'{"content": ', headers=JSON), 400, "not valid JSON"),
        (mallory.post("/api/channels/discussion/posts", json={"content": 42}), 400, "must be a string"),
        (mallory.post("/api/channels/discussion/posts", json={"content": "   "}), 400, "empty"),
        (mallory.post("/api/channels/discussion/posts", json={"content": "x" * (64 * 1024 + 1)}), 413, "limit"),
        (mallory.post("/api/channels/discussion/posts", data=b"x" * (600 * 1024)), 413, "limit"),
        (mallory.get("/api/git/commits", params={"limit": "lots"}), 400, "limit"),
        (mallory.get("/api/git/commits", params={"limit": "0"}), 400, "limit"),
        (mallory.get("/api/no/such/thing"), 404, "no such endpoint"),
    ]
    for r, status, message in checks:
        assert r.status_code == status and message in r.json()["error"], (r.request.url, r.status_code, r.text)
    assert hub_state(hub.data) == before


def test_limits_on_size_posts_pushes_and_registration(tmp_path):
    server = HubServer(tmp_path / "data", "--max-bundle-mb", "0.05", "--max-posts-per-hour", "3",
                       "--max-pushes-per-hour", "2", "--max-registrations-per-hour", "2").start()
    try:
        agent = server.register("limited")
        server.register("second")
        third = requests.post(server.url + "/api/register", json={"id": "third"})
        assert third.status_code == 429 and "rate limit" in third.json()["error"]

        assert agent.post("/api/channels", json={"name": "results", "description": ""}).status_code == 201
        assert [agent.post("/api/channels/results/posts", json={"content": f"p{i}"}).status_code
                for i in range(3)] == [201, 201, 429]

        repo = make_repo(tmp_path / "r", "limited")
        (repo / "weights.bin").write_bytes(os.urandom(100_000))  # incompressible: the bundle is over 0.05 MB
        git(repo, "add", "weights.bin")
        git(repo, "commit", "--quiet", "-m", "big")
        before = hub_state(server.data)
        big = agent.push(bundle(repo))
        assert big.status_code == 413 and "limit" in big.json()["error"]
        chunked = agent.post("/api/git/push", data=iter([bundle(repo)]))  # no Content-Length: caught while streaming
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
        third = agent.push(b"# v2 git bundle\n")  # the limit counts attempts: the third push in the hour is refused
        assert third.status_code == 429 and "rate limit" in third.json()["error"]
        assert hub_state(server.data) == before
    finally:
        server.stop()


def test_closed_hub_needs_the_admin_key(tmp_path):
    server = HubServer(tmp_path / "data", "--admin-key", "lab-secret").start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.post(server.url + "/api/register", json={"id": "outsider"}, headers=headers)
            assert r.status_code == 401 and "admin key" in r.json()["error"]
        agent = server.register("insider", admin_key="lab-secret")
        assert len(agent.key) == 64 and agent.get("/api/git/leaves").json() == []
        with sqlite3.connect(server.data / "hub.db") as db:  # only the key's hash is stored
            stored = db.execute("SELECT key_hash FROM agents").fetchone()[0]
        assert stored == hashlib.sha256(agent.key.encode()).hexdigest()
    finally:
        server.stop()


def test_a_fault_of_the_hub_is_a_json_500(tmp_path):
    server = HubServer(tmp_path / "data").start()
    try:
        agent = server.register("unlucky")
        repo = make_repo(tmp_path / "r", "unlucky")
        first = git(repo, "rev-parse", "HEAD")
        second = commit_change(repo, "x = 2\n", "two")
        assert agent.push(bundle(repo)).status_code == 200
        for f in (server.data / "repo.git" / "objects" / "pack").iterdir():  # the disk loses the objects
            f.unlink()
        r = agent.get(f"/api/git/diff/{first}/{second}")
        assert r.status_code == 500 and "internal error" in r.json()["error"]
    finally:
        server.stop()
