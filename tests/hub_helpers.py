"""Helpers the hub's tests share (test_hub*.py, test_launch.py, test_campaign.py): a hub.py subprocess on a free
loopback port, agents' git repositories, and program-hub.md's bash blocks run as written."""
import atexit
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import requests

from hub.gitrepo import checkout_files

ROOT = Path(__file__).resolve().parent.parent
BASE_ENV = {**os.environ, "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
            "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
JSON = {"Content-Type": "application/json"}
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed; program-hub.md uses it")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_checkout() -> Path:
    """A checkout of make_repo's files, the operator's baseline of every test hub that names none (made once)."""
    folder = Path(tempfile.gettempdir()) / f"hub-test-baseline-{os.getpid()}"
    if not folder.exists():
        made = make_repo(Path(tempfile.mkdtemp(prefix="hub-baseline-")) / "checkout", "baseline")
        os.replace(made, folder)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def baseline_config() -> dict:
    """The Config fields of a Hub in the test's own process, with baseline_checkout() as its baseline."""
    commit, files = checkout_files(baseline_checkout())
    return {"baseline": commit, "baseline_files": files}


class HubServer:
    """hub.py as a subprocess on a free loopback port; start() returns once /api/health answers. Unless the flags
    name a baseline, it is make_repo's files (--baseline-from)."""

    def __init__(self, data: Path, *flags: str, env: dict | None = None):
        named = any(f.startswith("--baseline") for f in flags)
        self.env = env
        self.data, self.flags = data, flags if named else (*flags, "--baseline-from", str(baseline_checkout()))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = open(data.parent / f"hub-{self.port}.log", "ab")

    def start(self) -> "HubServer":
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "hub.py"), "--data", str(self.data), "--port",
                                      str(self.port), "--log-level", "warning", *self.flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
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
    """A stand-in for a checkout of this project: its .gitignore, stand-ins for its other files (the same in every
    checkout, as the hub's baseline wants: only train.py differs), one upstream commit."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "-b", "main")
    for name in ("prepare.py", "pyproject.toml", "uv.lock", ".python-version", "program.md", "program-hub.md",
                 "README.md"):
        (path / name).write_text(f"{name} of this project\n")
    (path / "train.py").write_text(f"# {seed}\nlr = 1.0\n")
    for real in (".gitignore", "sandbox.py"):  # what program-hub.md's blocks use
        shutil.copy(ROOT / real, path / real)
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
    """Run program-hub.md's blocks as written, in this order and in one bash, in the checkout `repo` with HOME `home`
    ('register once' loads the key of an agent that is registered already); check: the script must succeed."""
    blocks = program_blocks()
    script = "\n".join(blocks[name] for name in names)
    result = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True, timeout=60,
                            env={**BASE_ENV, "HOME": str(home), "HUB": hub.url, **env})
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result.stdout


def startup_lines(dataset: str, profile: str) -> str:
    """The start-up line naming profile and dataset, rendered from runtime.py's own print call."""
    call = re.search(r'^    print\((f"profile: .*)\)$', (ROOT / "runtime.py").read_text(), re.M)[1]
    names = {"PROFILE": profile, "PROFILE_REASON": "no CUDA device, no AMX", "dataset": dataset, "MAX_SEQ_LEN": 256}
    return f"device:    cpu (test cpu, 2 threads)\n{eval(call, names)}\n"


def run_log(val_bpb: float | None, dataset: str = "stdlib", profile: str = "cpu") -> str:
    """run.log of a finished train.py run, or of a run that crashed after its start-up lines (val_bpb None)."""
    tail = (f"step 100\n---\nval_bpb:          {val_bpb:.6f}\npeak_vram_mb:     2048.0\ndevice:           cpu\n"
            f"profile:          {profile}\ndataset:          {dataset}\n") if val_bpb else "torch.OutOfMemoryError\n"
    return startup_lines(dataset, profile) + tail


def write_run_log(repo: Path, val_bpb: float | None, dataset: str = "stdlib", profile: str = "cpu") -> None:
    (repo / "run.log").write_text(run_log(val_bpb, dataset, profile))


def stand_in_uv(folder: Path) -> dict[str, str]:
    """The environment for program-hub.md's `run` block without a project venv: `uv run train.py` runs train.py
    with this Python (through sandbox.py), then prints $FAKE_RUN_LOG, if set, as the run's output."""
    (folder / "bin").mkdir(exist_ok=True)
    (folder / "bin" / "uv").write_text(f'#!/bin/sh\nshift\n{sys.executable} "$@" || exit\n'
                                       '[ -z "$FAKE_RUN_LOG" ] || cat "$FAKE_RUN_LOG"\n')
    (folder / "bin" / "uv").chmod(0o755)
    return {"PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}


def log_row(repo: Path, val_bpb: str, memory_gb: str, status: str, description: str, commit: str = "HEAD") -> None:
    """A row of results.tsv as program.md logs it (the header first, once)."""
    tsv = repo / "results.tsv"
    if not tsv.exists():
        tsv.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    with open(tsv, "a") as f:
        f.write(f"{git(repo, 'rev-parse', '--short', commit)}\t{val_bpb}\t{memory_gb}\t{status}\t{description}\n")


def key_file(home: Path, name: str) -> Path:
    return home / ".config" / "autoresearch" / "hub-keys" / name


def agent_of(hub: HubServer, repo: Path, home: Path) -> "Agent":
    """The agent whose name program-hub.md saved in this checkout, and whose key it saved under `home`."""
    name = re.fullmatch(r'export AGENT_ID="(.*)"\n', (repo / ".agenthub" / "agent").read_text())[1]
    return Agent(hub, name, re.fullmatch(r'export HUB_KEY="(.*)"\n', key_file(home, name).read_text())[1])


def written_since(folder: Path, since_ns: int, marks: list[str]) -> list[Path]:
    """Files directly in `folder` changed since `since_ns` that hold one of `marks` (a hash, a key, a name)."""
    found = []
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime_ns >= since_ns:
                head = path.read_bytes()[:65536]
                found += [path] if any(m.encode() in head for m in marks) else []
        except OSError:  # another user's file, or one that vanished
            pass
    return found


def hub_state(data: Path) -> dict:
    """What a bad request must not change: index rows, git objects, leftovers in incoming/."""
    with sqlite3.connect(data / "hub.db") as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("agents", "commits", "edges", "channels", "posts", "results")}
    objects = subprocess.run(["git", "--git-dir", str(data / "repo.git"), "count-objects", "-v"],
                             capture_output=True, text=True, check=True).stdout
    return {**counts, "objects": objects, "incoming": sorted(os.listdir(data / "incoming"))}


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
