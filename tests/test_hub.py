"""The hub's API: the agenthub loop as program-hub.md writes it, and every kind of bad input.

The real server (hub.py) runs as a subprocess on a free port of 127.0.0.1; agents are real git repositories in
temporary folders, driven by the bash blocks of program-hub.md exactly as written (curl included). Checked against
git itself: a fetched bundle must unbundle and check out in an unrelated repository, and bad pushes must leave the
index, the object store and the incoming folder as they were.
Run: uv run pytest tests/test_hub.py   (the helpers here are shared by tests/test_hub_*.py)
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from hub.core import Config, Hub, HubError

ROOT = Path(__file__).resolve().parent.parent
BASE_ENV = {**os.environ, "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
            "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed; program-hub.md uses it")

# ---------------------------------------------------------------------------
# Helpers: a hub subprocess, git repositories, program-hub.md's blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubServer:
    """hub.py as a subprocess on a free loopback port; start() returns once /api/health answers."""

    def __init__(self, data: Path, *flags: str):
        self.data, self.flags = data, flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = open(data.parent / f"hub-{self.port}.log", "ab")

    def start(self) -> "HubServer":
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "hub.py"), "--data", str(self.data), "--port",
                                      str(self.port), "--log-level", "warning", *self.flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.data.parent / f"hub-{self.port}.log").read_text()
            try:
                if requests.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError("hub did not become healthy")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()

    def register(self, name: str, admin_key: str | None = None) -> "Agent":
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        r = requests.post(self.url + "/api/register", json={"id": name}, headers=headers)
        assert r.status_code == 201, r.text
        return Agent(self, r.json()["id"], r.json()["api_key"])


class Agent:
    def __init__(self, hub: HubServer, name: str, key: str):
        self.hub, self.name, self.key = hub, name, key
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.hub.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.hub.url + path, **kw)

    def push(self, bundle: bytes) -> requests.Response:
        return self.post("/api/git/push", data=bundle)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=BASE_ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(path: Path, seed: str) -> Path:
    """A stand-in for a checkout of this project: the files program-hub.md commits, one upstream commit."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "-b", "main")
    for name in ("prepare.py", "pyproject.toml", "uv.lock", ".python-version", "program.md", "program-hub.md"):
        (path / name).write_text(f"{name} of {seed}\n")
    (path / "train.py").write_text(f"# {seed}\nlr = 1.0\n")
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", f"upstream history of {seed}")
    return path


def commit_change(repo: Path, text: str, message: str) -> str:
    with open(repo / "train.py", "a") as f:
        f.write(text)
    git(repo, "commit", "--quiet", "-am", message)
    return git(repo, "rev-parse", "HEAD")


def bundle(repo: Path, *revs: str) -> bytes:
    return subprocess.run(["git", "bundle", "create", "--quiet", "-", *(revs or ("HEAD",))], cwd=repo,
                          env=BASE_ENV, check=True, capture_output=True).stdout


def program_blocks() -> dict[str, str]:
    """program-hub.md's bash blocks by their first-line comment, e.g. '# push'."""
    text = (ROOT / "program-hub.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.M | re.S)]
    return {b.split("\n", 1)[0].lstrip("# ").strip(): b for b in blocks}


def run_blocks(hub: HubServer, home: Path, repo: Path, names: list[str], check: bool = True, **env: str) -> str:
    """Run program-hub.md's blocks as written, in this order and in one bash, as the agent whose home is `home`
    ('register once' loads the key of an agent that is registered already); check: the script must succeed."""
    blocks = program_blocks()
    script = "\n".join(blocks[name] for name in names)
    result = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True, timeout=60,
                            env={**BASE_ENV, "HOME": str(home), "HUB": hub.url, **env})
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result.stdout


def write_run_log(repo: Path, val_bpb: float, dataset: str = "stdlib", profile: str = "cpu") -> None:
    """The tail of a finished train.py run, as program.md greps it."""
    (repo / "run.log").write_text(
        f"device:    cpu (test cpu, 2 threads)\nprofile:   {profile} (forced), dataset {dataset}\nstep 100\n---\n"
        f"val_bpb:          {val_bpb:.6f}\npeak_vram_mb:     2048.0\ndevice:           cpu\n"
        f"profile:          {profile}\ndataset:          {dataset}\n")


def hub_state(data: Path) -> dict:
    """What a bad request must not change: index rows, git objects, leftovers in incoming/."""
    with sqlite3.connect(data / "hub.db") as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("agents", "commits", "edges", "channels", "posts", "results")}
    objects = subprocess.run(["git", "--git-dir", str(data / "repo.git"), "count-objects", "-v"],
                             capture_output=True, text=True, check=True).stdout
    return {**counts, "objects": objects, "incoming": sorted(os.listdir(data / "incoming"))}

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


@needs_curl
def test_two_agents_run_the_loop_from_program_hub(hub, tmp_path):
    repo_a, repo_b = make_repo(tmp_path / "a", "alpha"), make_repo(tmp_path / "b", "beta")
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    home_a.mkdir(), home_b.mkdir()

    # agent A: register, channels, orphan baseline, run, post, push
    address = run_blocks(hub, home_a, repo_a, ["the hub's address", "register once", "channels", "orphan baseline"],
                         AGENT_NAME="alpha")
    assert '"ok":true' in address
    assert "HUB_KEY" in (home_a / ".agenthub_creds").read_text()
    assert git(repo_a, "rev-list", "--count", "HEAD") == "1"  # orphan: none of the upstream history
    write_run_log(repo_a, 1.1)
    out = run_blocks(hub, home_a, repo_a, ["register once", "read the result", "post the result", "push"],
                     PLATFORM="cpu-test", DESC="baseline")
    baseline = git(repo_a, "rev-parse", "HEAD")
    assert f'"added":["{baseline}"]' in out

    # agent B, in an unrelated repository: fetch A's baseline by its 7-character hash, improve it, post, push
    short = baseline[:7]
    run_blocks(hub, home_b, repo_b, ["register once", "channels", "build on another commit"], AGENT_NAME="beta",
               HASH=short)
    assert git(repo_b, "rev-parse", "HEAD") == baseline
    improved = commit_change(repo_b, "lr = 0.5\n", "halve the learning rate")
    write_run_log(repo_b, 1.05)
    out = run_blocks(hub, home_b, repo_b,
                     ["register once", "read the result", "post the result", "push", "read the hub"],
                     PLATFORM="cpu-test", DESC="halve the learning rate")
    assert f'"added":["{improved}"]' in out
    assert '"status":"keep"' in out  # the read-the-hub block's results table

    beta = Agent(hub, "beta", (home_b / ".agenthub_creds").read_text().split('"')[1])
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

    results = beta.get("/api/results", params={"platform": "cpu-test"}).json()
    assert [(r["val_bpb"], r["commit"], r["dataset"], r["profile"]) for r in results] == [
        (1.05, improved[:7], "stdlib", "cpu"), (1.1, short, "stdlib", "cpu")]
    assert results[0]["vram_gb"] == 2.0

    # pushing a known commit again is a no-op; A fetching B's work fast-forwards A's repository
    again = requests.post(hub.url + "/api/git/push", data=bundle(repo_b),
                          headers={"Authorization": beta.http.headers["Authorization"]})
    assert again.json() == {"added": []}
    run_blocks(hub, home_a, repo_a, ["register once", "build on another commit"], HASH=improved[:7])
    assert git(repo_a, "rev-parse", "HEAD") == improved
    assert "lr = 0.5" in (repo_a / "train.py").read_text()


@needs_curl
def test_a_crash_and_a_discard_are_posted_but_not_kept(hub, tmp_path):
    repo, home = make_repo(tmp_path / "c", "gamma"), tmp_path / "home"
    home.mkdir()
    run_blocks(hub, home, repo, ["register once", "channels", "orphan baseline"], AGENT_NAME="gamma")
    (repo / "run.log").write_text("Traceback: out of memory\n")
    run_blocks(hub, home, repo, ["register once", "read the result", "post the result"], PLATFORM="gamma-gpu",
               DESC="double the width (CRASH: out of memory)")
    write_run_log(repo, 1.3)
    run_blocks(hub, home, repo, ["register once", "read the result", "post the result", "discuss"],
               PLATFORM="gamma-gpu", DESC="swiglu DISCARD", MSG="**wider** is out of memory at 2 GB")
    gamma = Agent(hub, "gamma", (home / ".agenthub_creds").read_text().split('"')[1])
    results = gamma.get("/api/results", params={"platform": "gamma-gpu"}).json()
    assert [(r["status"], r["val_bpb"], r["vram_gb"]) for r in results] == [("discard", 1.3, 2.0),
                                                                             ("crash", None, None)]
    posts = gamma.get("/api/channels/discussion/posts", params={"limit": 1}).json()
    assert posts[0]["content"] == "**wider** is out of memory at 2 GB" and posts[0]["agent_id"] == "gamma"

    # a #results post that does not parse stays a post and stays out of the table
    table = len(gamma.get("/api/results").json())
    note = gamma.post("/api/channels/results/posts", json={"content": "commit:abc1234 looked odd, re-running it"})
    assert note.status_code == 201
    assert gamma.get("/api/channels/results/posts", params={"limit": 1}).json()[0]["id"] == note.json()["id"]
    assert len(gamma.get("/api/results").json()) == table


@needs_curl
def test_a_taken_name_saves_no_key_and_another_name_registers(hub, mallory, tmp_path):
    repo, home = make_repo(tmp_path / "t", "taken"), tmp_path / "home"
    home.mkdir()
    out = run_blocks(hub, home, repo, ["register once"], check=False, AGENT_NAME="mallory")
    assert "is taken" in out and not (home / ".agenthub_creds").exists()
    run_blocks(hub, home, repo, ["register once"], AGENT_NAME="mallory-2")
    assert 'AGENT_ID="mallory-2"' in (home / ".agenthub_creds").read_text()


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
        (requests.post(url + "/api/register", data=b"{not json"), 400, "not valid JSON"),
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
        (mallory.post("/api/channels/discussion/posts", data=b'{"content": '), 400, "not valid JSON"),
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
