"""launch.py: N agents on one node, each in its own worktree with its own log, device and name, sharing one hub.

launch.py runs as a subprocess in a stand-in checkout with a stand-in agent: bash that runs program-hub.md's blocks
as written (register, channels, orphan baseline, read, post, push) around a faked `uv run train.py` (a run.log with
a given val_bpb), then waits like an agent in the middle of a run. Checked against the hub's own API (both agents'
results, under the names launch gave them, for the commits git says they pushed), the logs, git's worktree list,
and /proc (every process launch started is gone after a Ctrl-C or a SIGTERM). A second launch resumes in the same
worktrees. Bad input: one line each, nothing made.
Run: uv run pytest tests/test_launch.py   (5-15 s on 2 cores: two launches start a real hub)
"""
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hub_helpers import (BASE_ENV, ROOT, agent_of, alive, commit_change, free_port, git, make_repo, needs_curl,
                         program_blocks, startup_lines)

# the stand-in agent: setup and a kept run on its first launch, a discarded run on the next, then it waits for
# Ctrl-C in a child process (as an agent waits on train.py); val_bpb 1.I00000 and 0.9I0000 for agentI
STAND_IN = """set -e
echo "env AGENT_NAME=$AGENT_NAME HUB=$HUB CUDA_VISIBLE_DEVICES=[${{CUDA_VISIBLE_DEVICES-unset}}] in $(pwd -P)"
export PLATFORM=cpu-launch
I=${{AGENT_NAME##*agent}}
fake_run() {{ sed "s/VAL/$1/" {template} > run.log; }}  # stands in for `uv run train.py > run.log`
log_row() {{ printf '%s\\t%s\\t2.0\\t%s\\t%s\\n' "$(git rev-parse --short HEAD)" "$1" "$2" "$3" >> results.tsv; }}
if [ ! -f results.tsv ]; then
{setup}
  printf 'commit\\tval_bpb\\tmemory_gb\\tstatus\\tdescription\\n' > results.tsv
  echo "lr = 1.$I" >> train.py && git commit --quiet -am "learning rate 1.$I"
  fake_run "1.${{I}}00000" && log_row "1.${{I}}00000" keep "learning rate 1.$I"
{post}
{push}
else
{register}
  echo "lr = 0.$I" >> train.py && git commit --quiet -am "learning rate 0.$I"
  fake_run "0.9${{I}}0000" && log_row "0.9${{I}}0000" discard "learning rate 0.$I"
{post}
  git reset --quiet --hard HEAD~1
fi
echo "stand-in: waiting"
sleep 300
"""


def stand_in(tmp: Path) -> Path:
    blocks = program_blocks()

    def join(*names: str) -> str:
        return "\n".join(blocks[name] for name in names)

    template = tmp / "run.log.template"
    template.write_text(startup_lines("stdlib", "cpu") + "---\nval_bpb:          VAL\npeak_vram_mb:     2048.0\n")
    script = tmp / "stand-in.sh"
    script.write_text(STAND_IN.format(template=template, register=join("register once"),
                                      setup=join("the hub's address", "register once", "channels", "orphan baseline"),
                                      post=join("read the result", "post the result"), push=join("push")))
    return script


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Every live process below pid, from /proc's parent links."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found



def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def launch():
    """Starts launch.py in `repo` in a session of its own (so a Ctrl-C can reach it as a terminal sends one), its
    output appended to `out`; kills whatever a failed test left running."""
    procs = []

    def start(repo: Path, out: Path, *args: str, **kw) -> subprocess.Popen:
        with open(out, "ab") as f:
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=repo, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True, **kw))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            kill_all(descendants(proc.pid) | {proc.pid})
            proc.wait()


def interrupt(proc: subprocess.Popen, kill) -> None:
    """Stop launch with `kill(proc.pid)`; then nothing it started may be left."""
    tree = descendants(proc.pid)
    assert len(tree) >= 5, tree  # the hub, and each agent's bash and its sleep
    kill(proc.pid)
    assert proc.wait(timeout=60) == 130  # the stop takes up to 2 x STOP_SECONDS, and longer on a loaded machine
    left = [pid for pid in tree if alive(pid)]
    kill_all(left)
    assert left == []


@needs_curl
def test_two_agents_post_to_a_local_hub_stop_on_ctrl_c_and_resume(tmp_path, launch):
    repo, home, out, port = make_repo(tmp_path / "repo", "launch"), tmp_path / "home", tmp_path / "out", free_port()
    home.mkdir()
    command = ["--agents", "2", "--port", str(port), "--name", "t", "--status-every", "0.3", "--",
               "bash", str(stand_in(tmp_path))]
    env = {**BASE_ENV, "HOME": str(home)}
    url, trees = f"http://127.0.0.1:{port}", [repo / ".agents" / f"agent{i}" for i in range(2)]
    logs = [repo / ".agents" / f"agent{i}.log" for i in range(2)]

    def hub_rows():
        rows = agent_of(SimpleNamespace(url=url), trees[0], home).get("/api/results", params={"platform": "cpu-launch"})
        return sorted((r["agent_id"], r["val_bpb"], r["commit"], r["verified"]) for r in rows.json())

    def status(runs: str, best0: str, best1: str) -> bool:
        return f"agent0 {runs}, best {best0} | agent1 {runs}, best {best1}" in out.read_text()

    # first launch: new worktrees, a local hub, each agent sets up, then posts and pushes a kept run
    proc = launch(repo, out, *command, env=env)
    for i, log in enumerate(logs):
        wait_until(lambda: log.exists() and "stand-in: waiting" in log.read_text(), 60, f"agent{i} {out.read_text()}")
        assert (f"env AGENT_NAME=t-agent{i} HUB={url} CUDA_VISIBLE_DEVICES=[] in {trees[i].resolve()}\n"
                in log.read_text())
    heads = [git(tree, "rev-parse", "HEAD") for tree in trees]
    assert hub_rows() == [("t-agent0", 1.0, heads[0][:7], True), ("t-agent1", 1.1, heads[1][:7], True)]
    worktrees = git(repo, "worktree", "list", "--porcelain")
    assert all(f"worktree {tree.resolve()}\n" in worktrees for tree in trees)
    assert git(repo, "rev-parse", "launch/agent0", "launch/agent1").split() == [git(repo, "rev-parse", "main")] * 2
    assert git(repo, "status", "--porcelain") == ""  # .agents/ is ignored
    wait_until(lambda: status("1 run", "1.000000", "1.100000"), 10, "a status line")
    interrupt(proc, lambda pid: os.killpg(pid, signal.SIGINT))  # Ctrl-C: a terminal signals the whole group
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert out.read_text().count("(new)") == 2

    # second launch, the same command: the same worktrees, names and keys; one discarded run each
    proc = launch(repo, out, *command, env=env)
    for i, log in enumerate(logs):
        wait_until(lambda: log.read_text().count("stand-in: waiting") == 2, 60, f"agent{i} again {out.read_text()}")
    discarded = [git(tree, "rev-parse", "--short=7", "HEAD@{1}") for tree in trees]  # before the reset
    assert git(trees[0], "rev-parse", "HEAD") == heads[0] and git(trees[1], "rev-parse", "HEAD") == heads[1]
    assert hub_rows() == sorted([("t-agent0", 1.0, heads[0][:7], True), ("t-agent1", 1.1, heads[1][:7], True),
                                 ("t-agent0", 0.9, discarded[0], False), ("t-agent1", 0.91, discarded[1], False)])
    assert out.read_text().count("(reused)") == 2
    wait_until(lambda: status("2 runs", "1.000000", "1.100000"), 10, "a status line")  # the discards' 0.9 is no best
    interrupt(proc, lambda pid: os.kill(pid, signal.SIGTERM))  # a scheduler's stop: launch.py alone
    assert out.read_text().count("launch: stopped 2 agents and the hub") == 2


class Health(http.server.BaseHTTPRequestHandler):
    """A hub that is only healthy: what launch.py asks of a --hub before starting agents."""

    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def lab_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_one_agent_per_gpu_and_launch_ends_when_the_agents_do(tmp_path, lab_hub):
    repo = make_repo(tmp_path / "repo", "gpus")
    env = {k: v for k, v in BASE_ENV.items() if k != "HUB_ADMIN_KEY"}
    check = ('echo "gpu [$CUDA_VISIBLE_DEVICES] $AGENT_NAME $HUB key ${HUB_ADMIN_KEY-unset}"; '
             '[ $CUDA_VISIBLE_DEVICES = 3 ]')  # agent1 fails
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--gpus", "3,5", "--hub", lab_hub + "/",
                             "--name", "n", "--", "sh", "-c", check], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    logs = [(repo / ".agents" / f"agent{i}.log").read_text() for i in range(2)]
    assert f"gpu [3] n-agent0 {lab_hub} key unset\n" in logs[0] and f"gpu [5] n-agent1 {lab_hub} key unset\n" in logs[1]
    assert "agent0 exited with status 0" in result.stdout and "agent1 exited with status 1" in result.stdout
    assert "launch: stopped 2 agents;" in result.stdout  # no local hub


@pytest.mark.parametrize("args, message", [
    (["--agents", "2"], "no agent command: end the options with --"),
    (["--agents", "2", "--"], "no agent command"),
    (["--agents", "0", "--", "true"], "--agents 0: give at least 1"),
    (["--", "true"], "give --agents N"),
    (["--gpus", "0,1", "--agents", "3", "--", "true"], "--agents 3 but --gpus names 2 GPUs"),
    (["--gpus", "0,0", "--", "true"], "--gpus '0,0': give distinct CUDA device ids"),
    (["--gpus", "0,,1", "--", "true"], "give distinct CUDA device ids"),
    (["--agents", "1", "--name", "a b", "--", "true"], "--name 'a b'"),
    (["--agents", "1", "--port", "65536", "--", "true"], "--port 65536: give a port from 1 to 65535"),
    (["--agents", "1", "--status-every", "0", "--", "true"], "--status-every 0.0: give a positive number"),
    (["--agents", "1", "--", "true"], "is not in a git repository: run launch.py from your checkout"),
])
def test_bad_input_is_one_line_and_makes_nothing(tmp_path, args, message):
    folder = tmp_path / "plain"  # not a git repository: only the last case gets that far
    folder.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=folder, capture_output=True,
                            text=True, timeout=30, env={**BASE_ENV, "GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"launch: [^\n]+\n", result.stderr) and message in result.stderr, result.stderr
    assert list(folder.iterdir()) == []


def test_a_missing_agent_cli_or_a_taken_port_is_one_line(tmp_path, lab_hub):
    repo = make_repo(tmp_path / "repo", "missing")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), "--agents", "1", *args], cwd=repo,
                              capture_output=True, text=True, timeout=60, env=BASE_ENV)

    result = run("--hub", lab_hub, "--", "no-such-agent-cli", "-p", "hi")
    assert result.returncode == 1
    assert result.stderr == "launch: cannot run the agent command 'no-such-agent-cli': No such file or directory\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--port", str(port), "--", "true")
    assert result.returncode == 1
    assert result.stderr == f"launch: port {port} is in use: give --port another, or --hub URL to join the hub there\n"
