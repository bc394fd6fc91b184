"""The hub among untrusted agents (issue 34, items 3 to 5): no one agent can fill the disk or starve the others.

Each test is a reproduction of the review, on loopback with the real server: objects no commit reaches, a pack
that claims a million objects, disk quotas per agent and in total (shown on /api/health); every list paged with
?limit= and ?before= in its own order, leaves best-ranked first; a train.py over the size limit; diffs that hold
git up while a post and a push go through; a per-agent rate for diffs and fetches; a git call past its time limit
as 422 naming the limit. Checked against git itself (a bundle made by git with extra objects) and hand-set orders.
Run: uv run pytest tests/test_hub_untrusted.py
"""
import os
import shutil
import sqlite3
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from hub import core, gitrepo
from hub.core import Config, Hub, HubError
from hub.store import list_leaves
from hub_helpers import HubServer, baseline_config, bundle, commit_change, git, hub_state, make_repo

ADMIN = "untrusted-admin"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("untrusted") / "data", "--admin-key", ADMIN,
                       "--max-git-reads-per-hour", "5").start()
    yield server
    server.stop()


def bundle_with(repo: Path, extra: list[str]) -> bytes:
    """A bundle of HEAD whose pack also holds the objects `extra`, as git itself packs them."""
    objects = subprocess.run(["git", "rev-list", "--objects", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split("\n")
    pack = subprocess.run(["git", "pack-objects", "--stdout", "-q"], cwd=repo, capture_output=True, check=True,
                          input="\n".join(o.split(" ")[0] for o in objects + extra if o).encode() + b"\n").stdout
    return f"# v2 git bundle\n{git(repo, 'rev-parse', 'HEAD')} refs/heads/main\n\n".encode() + pack


def refused(agent, body: bytes, status: int, words: str) -> None:
    before = hub_state(agent.hub.data)
    r = agent.push(body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert hub_state(agent.hub.data) == before

# ---------------------------------------------------------------------------
# Item 3: objects no commit reaches, object-count bombs, disk quotas


def test_objects_no_commit_reaches_are_refused(hub, tmp_path):
    agent = hub.register("hoarder", admin_key=ADMIN)
    repo = make_repo(tmp_path / "repo", "hoarder")
    for i in range(200):
        (repo / f"junk{i}").write_text(f"junk {i}\n")  # untracked: nothing will reach these
    blobs = git(repo, "hash-object", "-w", *(f"junk{i}" for i in range(200))).split()
    refused(agent, bundle_with(repo, blobs), 400, "200 objects that its commits do not reach")
    assert agent.push(bundle(repo)).status_code == 200  # the same commit, bundled honestly


def test_a_pack_claiming_a_million_objects_is_refused_before_git_reads_it(hub):
    agent = hub.register("bomber", admin_key=ADMIN)
    body = b"# v2 git bundle\n" + b"ab" * 20 + b" refs/heads/main\n\n" + b"PACK" + struct.pack(">II", 2, 10**6)
    refused(agent, body + os.urandom(4096), 413, "holds 1000000 objects; the hub takes up to 50000 a push "
                                                 "(--max-objects-per-push)")


def random_push(agent, repo: Path, message: str) -> requests.Response:
    """A commit of 300 KB of random train.py, pushed with its whole history as program-hub.md pushes."""
    (repo / "train.py").write_bytes(os.urandom(300 * 1024))
    git(repo, "commit", "--quiet", "-am", message)
    return agent.push(bundle(repo))


def test_disk_quotas_per_agent_and_in_total_with_the_use_on_health(tmp_path):
    server = HubServer(tmp_path / "data", "--admin-key", ADMIN, "--max-agent-disk-mb", "0.5",
                       "--max-disk-mb", "2").start()
    try:
        filler = server.register("filler", admin_key=ADMIN)
        repo = make_repo(tmp_path / "repo", "filler")
        assert random_push(filler, repo, "fill").status_code == 200
        before = hub_state(server.data)
        r = random_push(filler, repo, "fill more")  # 300 KB more, and the history again: past 0.5 MB
        assert r.status_code == 413 and "(--max-agent-disk-mb)" in r.json()["error"], r.text
        assert hub_state(server.data) == before

        health = requests.get(server.url + "/api/health").json()
        assert health["disk_limit_mb"] == 2 and 0.29 < health["disk_mb"] < 0.35 and "agents_mb" not in health
        admin = requests.get(server.url + "/api/health", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert admin["agents_mb"] == {"filler": health["disk_mb"]}

        statuses = []
        for i in range(8):  # 300 KB each: the 2 MB in all are full after five more
            other = server.register(f"filler{i}", admin_key=ADMIN)
            r = random_push(other, make_repo(tmp_path / f"other{i}", f"other{i}"), "fill")
            statuses.append(r.status_code)
            assert r.status_code == 200 or "(--max-disk-mb)" in r.json()["error"]
        assert statuses == [200] * 5 + [507] * 3
        assert 1.7 < requests.get(server.url + "/api/health").json()["disk_mb"] <= 2
    finally:
        server.stop()

# ---------------------------------------------------------------------------
# Item 4: every list has a limit and a cursor, in its own order


def fill_index(data: Path, commits: int) -> list[str]:
    """A chain of commits straight in the index (no objects: lists read only the index), depth rising every 10th,
    with a side leaf off the 25th of every 50; returns the chain's hashes."""
    hub = Hub(Config(data, **baseline_config()))
    chain = [f"{i:040x}" for i in range(1, commits + 1)]
    with hub.store.transaction() as db:
        for i, sha in enumerate(chain):
            parents = [chain[i - 1]] if i else []
            side = side_leaf(i) if i % 50 == 25 else None
            for h, ps in [(sha, parents)] + ([(side, [sha])] if side else []):
                db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                           "VALUES (?, ?, 'm', 't', 'a', 't', ?)", (h, " ".join(ps), i // 10))
                db.executemany("INSERT INTO edges (parent, child) VALUES (?, ?)", [(p, h) for p in ps])
                db.executemany("UPDATE commits SET leaf = 0 WHERE hash = ?", [(p,) for p in ps])
    return chain


def side_leaf(i: int) -> str:
    return f"f{i:06x}" + "0" * 33  # its first 7 characters name it alone


def test_lists_page_with_limit_and_before_in_their_own_order(tmp_path):
    data = tmp_path / "data"
    chain = fill_index(data, 500)
    server = HubServer(data, "--admin-key", ADMIN).start()
    try:
        agent = server.register("reader", admin_key=ADMIN)
        leaves = agent.get("/api/git/leaves", params={"limit": 3}).json()
        assert [c["hash"] for c in leaves] == [chain[-1], side_leaf(475), side_leaf(425)]  # deepest first
        more = agent.get("/api/git/leaves", params={"limit": 100, "before": leaves[-1]["hash"][:7]}).json()
        assert len(more) == 8 and [c["depth"] for c in more] == sorted((c["depth"] for c in more), reverse=True)
        assert len(agent.get("/api/git/leaves").json()) == 11  # under the default limit of 50

        newest = agent.get("/api/git/commits", params={"limit": 2}).json()
        page = agent.get("/api/git/commits", params={"limit": 2, "before": newest[-1]["hash"]}).json()
        assert len(page) == 2 and page[0]["hash"] not in {c["hash"] for c in newest}

        kids = agent.get(f"/api/git/commits/{chain[25]}/children", params={"limit": 1}).json()
        rest = agent.get(f"/api/git/commits/{chain[25]}/children", params={"before": kids[0]["hash"]}).json()
        assert [kids[0]["hash"], rest[0]["hash"]] == [chain[26], side_leaf(25)] and len(rest) == 1  # newest first

        for name in ("b-chan", "a-chan", "c-chan"):
            assert agent.post("/api/channels", json={"name": name, "description": ""}).status_code == 201
        first = agent.get("/api/channels", params={"limit": 2}).json()
        assert [c["name"] for c in first] == ["a-chan", "b-chan"]
        assert [c["name"] for c in agent.get("/api/channels", params={"before": "b-chan"}).json()] == ["c-chan"]

        assert agent.post("/api/channels", json={"name": "results", "description": ""}).status_code == 201
        for i, value in enumerate([1.3, 1.1, 1.2, "---"]):
            content = f"commit:{chain[i][:7]} platform:p val_bpb:{value} | run {i}"
            assert agent.post("/api/channels/results/posts", json={"content": content}).status_code == 201
        best = agent.get("/api/results", params={"platform": "p", "limit": 2}).json()
        assert [r["val_bpb"] for r in best] == [1.1, 1.2]
        after = agent.get("/api/results", params={"platform": "p", "before": best[-1]["post_id"]}).json()
        assert [r["val_bpb"] for r in after] == [1.3, None]
    finally:
        server.stop()


def test_a_hub_db_from_before_the_leaf_column_is_upgraded(tmp_path):
    data = tmp_path / "data"
    chain = fill_index(data, 120)
    with sqlite3.connect(data / "hub.db") as db:
        db.execute("DROP INDEX commits_leaves")
        db.execute("ALTER TABLE commits DROP COLUMN leaf")
    leaves = list_leaves(Hub(Config(data, **baseline_config())).store, 5)
    assert [c["hash"] for c in leaves] == [chain[-1], side_leaf(75), side_leaf(25)]

# ---------------------------------------------------------------------------
# Item 5: train.py's size, diffs that hold git, a rate for diffs and fetches, 422 past git's time limit


def test_a_train_py_over_the_limit_is_413_naming_it(hub, tmp_path):
    agent = hub.register("huge", admin_key=ADMIN)
    repo = make_repo(tmp_path / "repo", "huge")
    (repo / "train.py").write_text("x = 1\n" * (1024 * 1024 // 6 + 1))  # just over 1 MB, compresses to nothing
    git(repo, "commit", "--quiet", "-am", "a long train.py")
    refused(agent, bundle(repo), 413, f"train.py of commit {git(repo, 'rev-parse', 'HEAD')} is 1048578 bytes; the "
                                      "hub takes files up to 1024 KB (--max-file-kb)")


def test_diffs_and_fetches_have_a_rate_per_agent(hub, tmp_path):
    agent = hub.register("differ", admin_key=ADMIN)
    repo = make_repo(tmp_path / "repo", "differ")
    a, b = git(repo, "rev-parse", "HEAD"), commit_change(repo, "y = 2\n", "two")
    assert agent.push(bundle(repo)).status_code == 200
    codes = [agent.get(f"/api/git/diff/{a}/{b}").status_code for _ in range(3)]
    codes += [agent.get(f"/api/git/fetch/{b[:7]}").status_code for _ in range(3)]
    assert codes == [200] * 5 + [429]
    assert "diff or fetch requests per hour" in agent.get(f"/api/git/diff/{a}/{b}").json()["error"]
    assert hub.register("other-reader", admin_key=ADMIN).get(f"/api/git/diff/{a}/{b}").status_code == 200


def test_slow_diffs_hold_up_neither_a_post_nor_a_push(tmp_path):
    """Diffs that each hold a git process 20 s (a stand-in git that sleeps first), more than the git slots: a post
    and a push from another agent still answer in seconds."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "git").write_text(f'#!/bin/sh\ncase "$*" in *" diff "*) sleep 20;; esac\nexec {shutil.which("git")} '
                                 '"$@"\n')
    (wrapper / "git").chmod(0o755)
    server = HubServer(tmp_path / "data", env={**os.environ, "PATH": f"{wrapper}:{os.environ['PATH']}"}).start()
    try:
        readers = [server.register(f"reader{i}") for i in range(4)]
        repo = make_repo(tmp_path / "repo", "slow")
        a, b = git(repo, "rev-parse", "HEAD"), commit_change(repo, "z = 3\n", "three")
        assert readers[0].push(bundle(repo)).status_code == 200
        pool = ThreadPoolExecutor(8)
        for reader in readers * 2:  # 8 diffs: 4 running, 4 queued
            pool.submit(lambda r=reader: r.get(f"/api/git/diff/{a}/{b}", timeout=60))
        time.sleep(1.0)
        writer = server.register("writer")
        started = time.monotonic()
        assert writer.post("/api/channels", json={"name": "discussion", "description": ""}).status_code == 201
        other = make_repo(tmp_path / "other", "writer")
        commit_change(other, "w = 1\n", "mine")
        assert writer.push(bundle(other)).status_code == 200
        assert time.monotonic() - started < 8
    finally:
        server.kill()  # a graceful stop would wait for the diffs
        server.stop()
        pool.shutdown(cancel_futures=True)


def test_a_git_call_past_its_time_limit_is_422_naming_it(tmp_path, monkeypatch):
    hub = Hub(Config(tmp_path / "data", **baseline_config()))
    repo = make_repo(tmp_path / "repo", "slow")
    a, b = git(repo, "rev-parse", "HEAD"), commit_change(repo, "q = 1\n", "one")
    (tmp_path / "push.bundle").write_bytes(bundle(repo))
    hub.push(tmp_path / "push.bundle", "a")
    monkeypatch.setattr(gitrepo, "GIT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(core, "GIT_TIMEOUT_S", 0.5)
    real = gitrepo.git_command
    monkeypatch.setattr(gitrepo, "git_command", lambda repo, args: ["sleep", "5"] if args[0] == "rev-list"
                        else real(repo, args))  # the walk of a push's history is slow now
    commit_change(repo, "q = 2\n", "two")
    (tmp_path / "push.bundle").write_bytes(bundle(repo))
    calls = [lambda: hub.push(tmp_path / "push.bundle", "a"), lambda: hub.diff(a, b), lambda: hub.fetch_bundle(b)]
    for i, call in enumerate(calls):
        if i == 1:
            monkeypatch.setattr(gitrepo, "git_command", lambda repo, args: ["sleep", "5"])  # every git call
        with pytest.raises(HubError) as e:
            call()
        assert e.value.status == 422 and "took git longer than 0.5 s, the hub's limit for one git call" in \
            e.value.message, e.value.message
    assert os.listdir(tmp_path / "data" / "incoming") == []
