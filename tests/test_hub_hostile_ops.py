"""The hub's rankings and its operation under hostile or unlucky conditions (issue 17, items 5 and 9).

Rankings: a result counts (best per platform, the chart, the frontier, the top of /api/results) only for a commit
its poster pushed; numbers parse strictly; depth counts commits with their pusher's kept result, not bare commits;
agent ids that differ only in case or look-alike characters are one id. Operations: HUB_ADMIN_KEY closes the hub
without the key in `ps`; `hub.py --revoke` stops a key at once on a running hub; a lost pack is reported at start-up
and the hub serves on; a full disk during a push is 507 and stores nothing; loose refs are packed; the pack folder is
fsynced once the pack is in it. All with the real server (hub.py on loopback) and real git, except where a Hub in
this process is the direct way to watch it (refs, fsync). Expected values are hand-counted.
Run: uv run pytest tests/test_hub_hostile_ops.py
"""
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hub_helpers import ROOT, HubServer, baseline_config, bundle, commit_change, git, hub_state, make_repo

from hub.core import Config, Hub
from hub.results import parse_result
from hub.store import Store, list_results

SEED = "ops"  # every repository starts from the same files, so every push keeps the hub's baseline files


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("ops") / "data", "--max-registrations-per-hour", "1000").start()
    yield server
    server.stop()


def leaf_depths(agent) -> dict[str, int]:
    return {c["hash"]: c["depth"] for c in agent.get("/api/git/leaves").json()}


def post_result(agent, sha: str, val_bpb: str, platform: str, note: str = "run") -> None:
    content = f"commit:{sha[:7]} platform:{platform} val_bpb:{val_bpb} vram_gb:1.0 | {note}"
    assert agent.post("/api/channels/results/posts", json={"content": content}).status_code == 201

# ---------------------------------------------------------------------------
# Rankings


def test_a_result_counts_only_for_a_commit_its_poster_pushed(hub, tmp_path):
    alice, mallory, bob = hub.register("alice"), hub.register("mallory"), hub.register("bob")
    assert alice.post("/api/channels", json={"name": "results", "description": ""}).status_code in (201, 409)
    repo = make_repo(tmp_path / "a", SEED)
    base = git(repo, "rev-parse", "HEAD")
    assert alice.push(bundle(repo)).status_code == 200
    tip = commit_change(repo, "lr = 0.5\n", "halve lr")
    assert alice.push(bundle(repo)).status_code == 200
    post_result(alice, tip, "0.950000", "forge")
    post_result(mallory, tip, "0.000001", "forge", "forged: alice's commit")
    post_result(mallory, "1234567", "0.000002", "forge", "forged: no such commit")
    # bob posts before pushing, as program-hub.md does: unverified until his push lands
    bobs = make_repo(tmp_path / "b", SEED)
    git(bobs, "fetch", "--quiet", str(repo), "HEAD")
    git(bobs, "reset", "--quiet", "--hard", "FETCH_HEAD")
    mine = commit_change(bobs, "warmup = 10\n", "warmup")
    post_result(bob, mine, "0.970000", "forge")
    table = [(r["val_bpb"], r["agent_id"], r["verified"]) for r in alice.get("/api/results?platform=forge").json()]
    assert table == [(0.95, "alice", True), (1e-06, "mallory", False), (2e-06, "mallory", False),
                     (0.97, "bob", False)]
    assert bob.push(bundle(bobs, f"{base}..HEAD")).status_code == 200
    table = [(r["val_bpb"], r["agent_id"], r["verified"]) for r in alice.get("/api/results?platform=forge").json()]
    assert table[:2] == [(0.95, "alice", True), (0.97, "bob", True)]

    page = requests.get(hub.url + "/").text
    assert re.findall(r"<td class='num best'>([0-9.]+)</td>", page) == ["0.950000"]
    frontier = page.split("Frontier")[1].split("</table>")[0]
    assert "0.000001" not in frontier and "0.970000" in frontier  # bob's leaf shows bob's own number
    assert leaf_depths(alice)[mine] == 2  # alice's and bob's kept results, each on its poster's commit


def test_depth_counts_kept_results_not_bare_commits(hub, tmp_path):
    carol = hub.register("carol")
    repo = make_repo(tmp_path / "c", SEED)
    base = git(repo, "rev-parse", "HEAD")
    chain = [commit_change(repo, f"x{i} = {i}\n", f"bare {i}") for i in range(20)]
    assert carol.push(bundle(repo)).status_code == 200
    assert leaf_depths(carol)[chain[-1]] == 0  # twenty commits, no results: no deeper than the root
    post_result(carol, chain[4], "1.0", "depth")  # after the push: the commit and all above it deepen
    post_result(carol, chain[4], "1.0", "depth", "DISCARD rerun")  # a discard is no improvement
    post_result(carol, chain[9], "1.0", "depth", "CRASH")
    assert leaf_depths(carol)[chain[-1]] == 1
    stranger = hub.register("stranger")
    post_result(stranger, chain[-1], "0.5", "depth")  # not his commit: no depth
    assert leaf_depths(carol)[chain[-1]] == 1
    post_result(carol, chain[-1], "0.9", "depth")
    assert leaf_depths(carol)[chain[-1]] == 2
    assert carol.get(f"/api/git/commits/{chain[3]}").json()["depth"] == 0
    assert carol.get(f"/api/git/commits/{base}").json()["depth"] == 0


def test_numbers_parse_strictly():
    head = "commit:a1b2c3d platform:H100"
    for bad in ("1_0", "inf", "nan", "Infinity", "\u0663", "1e999", "+1", "-1", "0x1", "1.0.0", "\uff11"):
        assert parse_result(f"{head} val_bpb:{bad} | x") is None, bad
        assert parse_result(f"{head} val_bpb:1.0 vram_gb:{bad} | x") is None, bad
    for text, value in (("0.991200", 0.9912), ("30", 30.0), (".5", 0.5), ("44.", 44.0), ("1e-3", 0.001),
                        ("2E2", 200.0)):
        assert parse_result(f"{head} val_bpb:{text} vram_gb:{text} | x")["vram_gb"] == value, text


def test_look_alike_ids_are_one_id(hub):
    hub.register("dave")
    for twin in ("Dave", "DAVE", "dave_", "dave.", "d-ave"):
        r = requests.post(hub.url + "/api/register", json={"id": twin})
        assert r.status_code == 409 and "is taken" in r.json()["error"], twin
    hub.register("olive")
    for twin in ("0live", "o1ive", "oIive", "0LIVE-"):
        assert requests.post(hub.url + "/api/register", json={"id": twin}).status_code == 409, twin
    hub.register("davey")  # a different name still registers

# ---------------------------------------------------------------------------
# Operations


def test_admin_key_from_the_environment_stays_out_of_ps(tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_ADMIN_KEY", "env-secret-42")
    server = HubServer(tmp_path / "data").start()
    try:
        r = requests.post(server.url + "/api/register", json={"id": "outsider"})
        assert r.status_code == 401 and "admin key" in r.json()["error"]
        server.register("insider", admin_key="env-secret-42")
        assert b"env-secret-42" not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
    finally:
        server.stop()


def test_revoke_stops_a_key_on_a_running_hub(hub):
    eve = hub.register("eve")
    assert eve.get("/api/git/leaves").status_code == 200

    def revoke(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "hub.py"), "--data", str(hub.data), "--revoke", name],
                              capture_output=True, text=True, timeout=30)

    done = revoke("eve")
    assert done.returncode == 0 and "revoked" in done.stdout
    r = eve.get("/api/git/leaves")
    assert r.status_code == 401 and "unknown API key" in r.json()["error"]
    assert requests.post(hub.url + "/api/register", json={"id": "eve"}).status_code == 409  # the id stays taken
    unknown = revoke("nobody")
    assert unknown.returncode == 1 and "no agent 'nobody'" in unknown.stderr


def test_lost_packs_are_reported_and_the_hub_serves_on(tmp_path):
    data = tmp_path / "data"
    server = HubServer(data).start()
    agent = server.register("keeper")
    repo = make_repo(tmp_path / "r", SEED)
    kept = git(repo, "rev-parse", "HEAD")
    assert agent.push(bundle(repo)).status_code == 200
    packs = set((data / "repo.git" / "objects" / "pack").glob("*.pack"))
    lost = []
    for name in ("lost with its ref", "lost, its ref left"):  # two pushes on top of `kept`, both lost below
        git(repo, "reset", "--quiet", "--hard", kept)
        lost.append(commit_change(repo, f"# {name}\n", name))
        assert agent.push(bundle(repo, f"{kept}..HEAD")).status_code == 200
    server.stop()
    for pack in set((data / "repo.git" / "objects" / "pack").glob("*.pack")) - packs:  # the disk loses them
        for f in pack.parent.glob(pack.stem + ".*"):
            f.unlink()
    subprocess.run(["git", "--git-dir", str(data / "repo.git"), "update-ref", "-d", f"refs/hub/{lost[0]}"], check=True)

    server = HubServer(data).start()
    agent.hub = server
    try:
        log = (tmp_path / f"hub-{server.port}.log").read_text()
        assert "2 indexed commits have no objects" in log and all(sha in log for sha in lost) and kept not in log
        assert agent.get(f"/api/git/fetch/{kept[:7]}").status_code == 200
        assert agent.get(f"/api/git/fetch/{lost[1][:7]}").status_code == 500
        git(repo, "reset", "--quiet", "--hard", kept)
        after = commit_change(repo, "after = 1\n", "after the loss")
        assert agent.push(bundle(repo, f"{kept}..HEAD")).json() == {"added": [after]}  # a broken ref breaks this
    finally:
        server.stop()


def tmpfs_works(folder: Path) -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (CI runners may not)."""
    folder.mkdir()
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "tmpfs",
                               str(folder)], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def snapshot_state(seen: Path, copy: Path) -> dict:
    """hub_state of a copy: SQLite resolves /proc/PID/root to this process's own root, so it cannot open it there."""
    shutil.copytree(seen, copy)
    return hub_state(copy)


def test_a_full_disk_during_a_push_is_507_and_stores_nothing(tmp_path):
    data = tmp_path / "data"
    if not tmpfs_works(data):
        pytest.skip("needs `unshare` and user namespaces that may mount a tmpfs, to give the hub a small disk")
    server = HubServer(data)
    # the hub runs in its own mount namespace with --data on a 2 MB tmpfs; this process sees it via /proc/PID/root
    mount = f"mount -t tmpfs -o size=2m tmpfs {data} && exec \"$@\""
    server.proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh",
                                    sys.executable, str(ROOT / "hub.py"), "--data", str(data), "--port",
                                    str(server.port), "--log-level", "warning", *server.flags],
                                   stdout=server.log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        for _ in range(300):
            assert server.proc.poll() is None, (tmp_path / f"hub-{server.port}.log").read_text()
            try:
                if requests.get(server.url + "/api/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise TimeoutError("hub did not become healthy")
        seen = Path(f"/proc/{server.proc.pid}/root") / data.relative_to("/")
        agent = server.register("filler")
        repo = make_repo(tmp_path / "r", SEED)
        assert agent.push(bundle(repo)).status_code == 200
        fs = os.statvfs(seen)
        free = fs.f_bavail * fs.f_frsize
        (repo / "train.py").write_bytes(os.urandom(int(free * 0.6)))  # the body fits; its unpacked copy does not
        git(repo, "commit", "--quiet", "-am", "too big for the disk")
        before = snapshot_state(seen, tmp_path / "before")
        r = agent.push(bundle(repo))
        assert r.status_code == 507 and "disk is full" in r.json()["error"], r.text
        assert snapshot_state(seen, tmp_path / "after") == before
    finally:
        server.stop()

# ---------------------------------------------------------------------------
# The repository: refs packed, the pack's folder fsynced (a Hub in this process)


def push_file(hub: Hub, tmp: Path, data: bytes, agent: str = "a") -> list[str]:
    path = tmp / "push.bundle"
    path.write_bytes(data)
    return hub.push(path, agent)


def test_loose_refs_are_packed(tmp_path):
    hub = Hub(Config(tmp_path / "data", max_loose_refs=3, **baseline_config()))
    refs = tmp_path / "data" / "repo.git" / "refs" / "hub"
    repo = make_repo(tmp_path / "r", SEED)
    pushed = [git(repo, "rev-parse", "HEAD")]
    push_file(hub, tmp_path, bundle(repo))
    loose = []
    for i in range(4):
        pushed.append(commit_change(repo, f"n = {i}\n", f"step {i}"))
        push_file(hub, tmp_path, bundle(repo, "HEAD~1..HEAD"))
        loose.append(len(list(refs.iterdir())))
    assert loose == [2, 0, 1, 2]  # packed on the push that brought the count to 3
    listed = git(tmp_path / "data" / "repo.git", "for-each-ref", "--format=%(objectname)", "refs/hub/").split()
    assert sorted(listed) == sorted(pushed)
    Hub(Config(tmp_path / "data", **baseline_config()))  # a restart packs what is loose
    assert list(refs.iterdir()) == []


def test_the_pack_folder_is_fsynced_with_the_pack_in_it(tmp_path, monkeypatch):
    hub = Hub(Config(tmp_path / "data", **baseline_config()))
    pack_dir = tmp_path / "data" / "repo.git" / "objects" / "pack"
    synced = []
    real_fsync = os.fsync

    def watch(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(pack_dir):
            synced.append(sorted(p.suffix for p in pack_dir.iterdir()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watch)
    push_file(hub, tmp_path, bundle(make_repo(tmp_path / "r", SEED)))
    assert [".idx", ".pack"] in synced  # a sync after both names are in place
    assert synced.index([".pack"]) < synced.index([".idx", ".pack"])  # the pack's rename is durable before the index's


def test_a_hub_db_from_before_verification_is_upgraded(tmp_path):
    path = tmp_path / "hub.db"
    Store(path)
    with sqlite3.connect(path) as db:  # back to the old results table, with one own and one forged result
        for index in ("results_commit", "results_rank", "results_platform_rank"):
            db.execute(f"DROP INDEX {index}")
        db.execute("ALTER TABLE results DROP COLUMN commit_hash")
        db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                   "VALUES (?, '', '', '', 'alice', '', 0)", ("ab" * 20,))
        for post_id, agent in ((1, "alice"), (2, "mallory")):
            db.execute("INSERT INTO results (post_id, agent_id, commit_prefix, platform, dataset, profile, val_bpb, "
                       "status, description, fields, created_at) VALUES (?, ?, 'abababa', 'p', '', '', 1.0, 'keep', "
                       "'', '{}', '')", (post_id, agent))
    verified = {r["agent_id"]: r["verified"] for r in list_results(Store(path), 10)}
    assert verified == {"alice": True, "mallory": False}
