"""The hub under SIGKILL and under concurrent load.

The server is killed with SIGKILL while it receives a push body, while a push is inside index-pack (its quarantine
folder exists), and at a random moment in a stream of pushes; after each restart `git fsck` must pass, the index
must be whole (every indexed commit is in git with its ref, every parent indexed, edges match parents, nothing left
in incoming/) and every push acknowledged before the kill must be there. Then many agents post and push at once for
a few seconds, and every acknowledged post and commit must be there afterwards.
Run: uv run pytest tests/test_hub_durability.py
"""
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from hub_helpers import HubServer, alive, bundle, commit_change, git, make_repo


def check_consistent(data: Path) -> set[str]:
    """The invariants no kill may break; returns the indexed hashes."""
    repo = data / "repo.git"
    fsck = subprocess.run(["git", "--git-dir", str(repo), "fsck", "--no-progress", "--no-dangling"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with sqlite3.connect(data / "hub.db") as db:
        commits = {sha: parents.split() for sha, parents in db.execute("SELECT hash, parents FROM commits")}
        edges = set(db.execute("SELECT parent, child FROM edges"))
    assert edges == {(p, sha) for sha, parents in commits.items() for p in parents}
    assert all(set(parents) <= commits.keys() for parents in commits.values())
    if commits:
        types = subprocess.run(["git", "--git-dir", str(repo), "cat-file", "--batch-check=%(objecttype)"],
                               input="\n".join(commits) + "\n", capture_output=True, text=True, check=True).stdout
        assert set(types.split()) == {"commit"}
    refs = subprocess.run(["git", "--git-dir", str(repo), "for-each-ref", "--format=%(refname:lstrip=2)",
                           "refs/hub/"], capture_output=True, text=True, check=True).stdout.split()
    assert set(refs) == commits.keys()
    assert os.listdir(data / "incoming") == []
    return set(commits)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def in_incoming(data: Path, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in os.listdir(data / "incoming"))


class Pusher(threading.Thread):
    """Commits a 256 KB random blob and pushes, again and again, until the hub goes away."""

    def __init__(self, agent, repo: Path):
        super().__init__(daemon=True)
        self.agent, self.repo, self.acknowledged = agent, repo, []

    def run(self):
        for n in range(1000):
            (self.repo / "blob.bin").write_bytes(os.urandom(256 * 1024))
            git(self.repo, "add", "blob.bin")
            sha = commit_change(self.repo, f"step = {n}\n", f"step {n}")
            try:
                r = self.agent.push(bundle(self.repo, "HEAD~1..HEAD") if n else bundle(self.repo))
            except requests.ConnectionError:
                return
            assert r.status_code == 200, r.text
            self.acknowledged.append(sha)


def test_sigkill_mid_push_loses_nothing_acknowledged(tmp_path):
    data = tmp_path / "data"
    server = HubServer(data, "--allowed-paths", "train.py", "blob.bin", "big.bin", "--max-file-kb", "8192").start()
    agent = server.register("survivor")
    repo = make_repo(tmp_path / "repo", "survivor")
    assert agent.push(bundle(repo)).status_code == 200
    acknowledged = {git(repo, "rev-parse", "HEAD")}

    # 1. killed while receiving a large body: the half-received file is dropped at restart
    (repo / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    git(repo, "add", "big.bin")
    big = commit_change(repo, "big = True\n", "big")
    body = bundle(repo, "HEAD~1..HEAD")

    def slowly():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]
            time.sleep(0.02)

    sender = threading.Thread(target=lambda: _ignore_disconnect(agent.post, "/api/git/push", data=slowly()))
    sender.start()
    wait_for(lambda: in_incoming(data, "body-"))
    server.kill()
    sender.join()
    server.start()
    assert check_consistent(data) == acknowledged

    # 2. killed inside index-pack, and 3. at a random moment in a stream of pushes
    for round, kill_when in enumerate(["quarantine", "random"]):
        agent.http = requests.Session()  # the old one's connections died with the server
        agent.http.headers["Authorization"] = f"Bearer {agent.key}"
        branch = make_repo(tmp_path / f"stream{round}", f"stream{round}")
        pusher = Pusher(agent, branch)
        pusher.start()
        if kill_when == "quarantine":
            wait_for(lambda: len(pusher.acknowledged) >= 2 and in_incoming(data, "push-"))
        else:
            wait_for(lambda: len(pusher.acknowledged) >= 2)
            time.sleep(random.uniform(0.0, 0.3))
        server.kill()
        pusher.join()
        acknowledged |= set(pusher.acknowledged)
        server.start()
        indexed = check_consistent(data)
        assert acknowledged <= indexed

    # the hub still takes pushes, the big one included, and serves them back
    agent.http = requests.Session()
    agent.http.headers["Authorization"] = f"Bearer {agent.key}"
    assert agent.push(body).json() == {"added": [big]}
    fetched = agent.get(f"/api/git/fetch/{big[:7]}")
    assert fetched.status_code == 200 and fetched.content.startswith(b"# v2 git bundle\n")
    server.stop()
    assert acknowledged | {big} <= check_consistent(data)


def _ignore_disconnect(call, *args, **kw):
    try:
        call(*args, **kw)
    except requests.ConnectionError:
        pass


def test_concurrent_agents_lose_no_acknowledged_post_or_commit(tmp_path):
    data = tmp_path / "data"
    server = HubServer(data, "--allowed-paths", "train.py", "blob.bin", "big.bin", "--max-file-kb", "8192").start()
    agents = [server.register(f"agent{i}") for i in range(6)]
    assert agents[0].post("/api/channels", json={"name": "results", "description": ""}).status_code == 201
    posted, pushed = [], []  # list.append is atomic, so the workers can share these

    def work(i):
        agent, repo = agents[i], make_repo(tmp_path / f"repo{i}", "shared start")
        deadline = time.monotonic() + 4.0
        n = 0
        while time.monotonic() < deadline:
            content = f"commit:{'%07x' % (i * 1000 + n)} platform:p{i % 2} val_bpb:{1 + n / 100:.4f} | run {n}"
            r = agent.post("/api/channels/results/posts", json={"content": content})
            assert r.status_code == 201, r.text
            posted.append((r.json()["id"], content))
            if n % 4 == 0:
                sha = commit_change(repo, f"n = {n}\n", f"{agent.name} {n}")
                r = agent.push(bundle(repo))
                assert r.status_code == 200, r.text
                pushed.append(sha)
            n += 1

    with ThreadPoolExecutor(len(agents)) as pool:
        for future in [pool.submit(work, i) for i in range(len(agents))]:
            future.result()

    reader = agents[0]
    stored, before = {}, None
    while True:
        page = reader.get("/api/channels/results/posts",
                          params={"limit": 500, **({"before": before} if before else {})}).json()
        if not page:
            break
        stored.update({p["id"]: p["content"] for p in page})
        before = page[-1]["id"]
    assert stored == dict(posted)
    assert len(reader.get("/api/results", params={"limit": 500}).json()) == min(len(posted), 500)
    for sha in pushed:
        assert reader.get(f"/api/git/commits/{sha}").status_code == 200
    server.stop()
    assert set(pushed) <= check_consistent(data)


def test_git_children_die_with_a_killed_hub(tmp_path):
    """A git child of a hub killed with SIGKILL (here a diff that hangs) dies with it."""
    data, wrapper = tmp_path / "data", tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "git").write_text(f'#!/bin/sh\ncase "$*" in *" diff "*) echo $$ > {tmp_path}/diff.pid; exec sleep 120;; '
                                 f'esac\nexec {shutil.which("git")} "$@"\n')  # a diff that hangs, its pid noted
    (wrapper / "git").chmod(0o755)
    server = HubServer(data, env={**os.environ, "PATH": f"{wrapper}:{os.environ['PATH']}"}).start()
    agent = server.register("orphaner")
    repo = make_repo(tmp_path / "repo", "orphaner")
    first, second = git(repo, "rev-parse", "HEAD"), commit_change(repo, "x = 1\n", "two")
    assert agent.push(bundle(repo)).status_code == 200
    threading.Thread(target=_ignore_disconnect, args=(agent.get, f"/api/git/diff/{first}/{second}"),
                     daemon=True).start()
    wait_for(lambda: (tmp_path / "diff.pid").exists() and (tmp_path / "diff.pid").read_text().endswith("\n"))
    child = int((tmp_path / "diff.pid").read_text())
    try:
        server.kill()
        wait_for(lambda: not alive(child), timeout=5)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        server.stop()


def test_stale_locks_are_removed_at_start_up(tmp_path):
    """The lock files a killed git leaves (a power cut during pack-refs leaves packed-refs.lock) are removed at the
    next start, which says so in one line, and the hub serves."""
    data = tmp_path / "data"
    server = HubServer(data).start()
    agent = server.register("locked")
    repo = make_repo(tmp_path / "repo", "locked")
    first, second = git(repo, "rev-parse", "HEAD"), commit_change(repo, "x = 1\n", "two")
    assert agent.push(bundle(repo)).status_code == 200
    server.kill()
    (data / "repo.git" / "packed-refs.lock").write_text("")
    (data / "repo.git" / "refs" / "hub" / f"{second}.lock").write_text("")
    server.start()
    log = (tmp_path / f"hub-{server.port}.log").read_text()
    assert f"hub: removed 2 lock files a killed git left in {data / 'repo.git'}: packed-refs.lock, " in log
    assert not list((data / "repo.git").rglob("*.lock"))
    agent.http = requests.Session()
    agent.http.headers["Authorization"] = f"Bearer {agent.key}"
    assert agent.push(bundle(repo)).json() == {"added": []} and check_consistent(data) == {first, second}
    server.stop()

