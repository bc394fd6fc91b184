"""
N coding agents on one node: each in its own git worktree, on its own GPU, with its own log, all sharing one hub.

Usage:
    uv run launch.py --gpus 0,1,2,3 -- claude -p "Read program-hub.md and kick off a new experiment" \\
        --dangerously-skip-permissions                      # 4 agents, one per GPU, and a local hub
    uv run launch.py --agents 2 -- AGENT COMMAND...          # 2 agents on the CPU (CUDA_VISIBLE_DEVICES empty)
    uv run launch.py --gpus 0,1 --hub http://hub.lab:8765 --name node3 -- AGENT COMMAND...   # a lab's hub

Run it from the top of your checkout. Agent I works in .agents/agentI, a git worktree made on branch launch/agentI
at HEAD, or the one already there (it is reused as it is: running the same command again resumes), with AGENT_NAME
(NAME-agentI), HUB and CUDA_VISIBLE_DEVICES in its environment; its output is appended to .agents/agentI.log.
Without --hub, a local hub serves .agents/hub-data on 127.0.0.1:--port (log .agents/hub.log), closed with a key
only these agents get. Every --status-every seconds one line: runs and best kept val_bpb per agent, from each
worktree's results.tsv. Ctrl-C (or SIGTERM) stops every agent's process group, then the hub.
"""

import argparse
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import harness

AGENTS_DIR = ".agents"                  # worktrees, logs and the local hub's data, inside the checkout (ignored)
STOP_SECONDS = 10                       # between SIGTERM and SIGKILL
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,50}")  # the hub's agent ids, room left for -agentI


class Agent(NamedTuple):
    label: str          # agentI: its folder and log
    worktree: Path
    log: Path
    proc: subprocess.Popen


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launch's options, and the agent command after the first `--`."""
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description="N coding agents on one node, one worktree and GPU each, one hub.",
                                usage="launch.py [--agents N] [--gpus 0,1,...] [--hub URL] ... -- AGENT COMMAND...")
    p.add_argument("--agents", type=int, help="how many agents (default: one per --gpus id)")
    p.add_argument("--gpus", help="comma-separated CUDA device ids, one per agent; unset: the agents train on the CPU")
    p.add_argument("--hub", help="the hub's URL; unset: start a local hub in .agents/hub-data")
    p.add_argument("--port", type=int, default=8765, help="the local hub's port")
    p.add_argument("--name", default=socket.gethostname().split(".")[0][:40],
                   help="agents are NAME-agent0, NAME-agent1, ... on the hub (default: this machine's short name)")
    p.add_argument("--status-every", type=float, default=60, help="seconds between status lines")
    return p.parse_args(argv[:split]), argv[split + 1:]


def check_args(args: argparse.Namespace, command: list[str]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each agent ('' for the CPU); bad input stops with one line."""
    if not command:
        fail("no agent command: end the options with -- and the command, e.g. -- claude -p '...'")
    if not 0 < args.port < 65536:
        fail(f"--port {args.port}: give a port from 1 to 65535")
    if not args.status_every > 0:  # `not >` also refuses nan
        fail(f"--status-every {args.status_every}: give a positive number of seconds")
    if not NAME_RE.fullmatch(args.name):
        fail(f"--name {args.name!r}: at most 51 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if args.gpus is None:
        if args.agents is None:
            fail("give --agents N to run N agents on the CPU, or --gpus 0,1,... for one agent per GPU")
        gpus = [""] * args.agents
    else:
        gpus = args.gpus.split(",")
        if any(not g or g != g.strip() for g in gpus) or len(set(gpus)) != len(gpus):
            fail(f"--gpus {args.gpus!r}: give distinct CUDA device ids separated by commas, e.g. --gpus 0,1,2,3")
        if args.agents is not None and args.agents != len(gpus):
            fail(f"--agents {args.agents} but --gpus names {len(gpus)} GPUs: one GPU per agent "
                 f"(drop --agents to run {len(gpus)})")
    if not gpus:
        fail(f"--agents {args.agents}: give at least 1")
    return gpus


def fail(message: str) -> None:
    sys.exit(f"launch: {message}")


def checkout_root() -> Path:
    try:
        return Path(harness.git("rev-parse", "--show-toplevel"))
    except harness.GitError:
        fail(f"{Path.cwd()} is not in a git repository: run launch.py from your checkout of autoresearch")


def start_local_hub(folder: Path, port: int, admin_key: str, baseline: Path) -> subprocess.Popen:
    """hub.py on 127.0.0.1:port with its data in folder/hub-data and its log folder/hub.log; pushes may change only
    train.py from the files of the checkout `baseline`."""
    with socket.socket() as s:  # a hub already on the port would answer our health checks instead
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            fail(f"port {port} is in use: give --port another, or --hub URL to join the hub there")
    return harness.start_hub(folder / "hub-data", port, admin_key, folder / "hub.log", baseline)


def start_agent(command: list[str], worktree: Path, log: Path, env: dict) -> subprocess.Popen:
    """The agent command in its worktree, output appended to its log, in a process group of its own so that
    stopping it stops everything it started (train.py runs included)."""
    shown = " ".join(f"{k}={env[k]}" for k in ("AGENT_NAME", "HUB", "CUDA_VISIBLE_DEVICES"))
    with open(log, "ab") as out:
        out.write(f"== launch {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown} {shlex.join(command)}\n".encode())
        out.flush()
        try:
            return subprocess.Popen(command, cwd=worktree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            fail(f"cannot run the agent command {command[0]!r}: {e.strerror}")


def tally(results: Path) -> tuple[int, float | None]:
    """Rows of a results.tsv and the lowest val_bpb among its keep rows; (0, None) before the first row."""
    rows = harness.read_results(results)[1]
    kept = []
    for row in rows:
        try:
            kept += [float(row[1])] if row[3] == "keep" else []
        except (IndexError, ValueError):  # a row the agent mistyped counts as a run, never as a best
            pass
    return len(rows), min(kept, default=None)


def status_line(agents: list[Agent], seconds: float) -> str:
    parts = []
    for agent in agents:
        runs, best = tally(agent.worktree / "results.tsv")
        text = f"{agent.label} {runs} run{'s' * (runs != 1)}, best " + (f"{best:.6f}" if best is not None else "-")
        code = agent.proc.poll()
        parts.append(text + (f", exited {code}" if code is not None else ""))
    return f"launch {timedelta(seconds=round(seconds))}  " + " | ".join(parts)


def watch(agents: list[Agent], hub: subprocess.Popen | None, hub_log: Path, every: float) -> int:
    """Status lines until every agent has exited (0 when all exited 0); a local hub that dies stops the night."""
    start = time.monotonic()
    next_status, running = start + every, set(range(len(agents)))
    while running:
        time.sleep(0.2)
        for i in sorted(running):
            if agents[i].proc.poll() is not None:
                running.discard(i)
                print(f"launch: {agents[i].label} exited with status {agents[i].proc.returncode}; "
                      f"its log is {agents[i].log}")
        if hub and hub.poll() is not None:
            print(f"launch: the local hub stopped (status {hub.returncode}): {harness.last_line(hub_log)}")
            return 1
        if time.monotonic() >= next_status:
            print(status_line(agents, time.monotonic() - start))
            next_status += every
    print(status_line(agents, time.monotonic() - start))
    return int(any(agent.proc.returncode for agent in agents))


def make_worktrees(repo: Path, folder: Path, gpus: list[str], name: str) -> list[Path]:
    """folder/agentI for each agent, made or reused, each announced with its name, device and log."""
    worktrees = []
    for i, gpu in enumerate(gpus):
        worktrees.append(folder / f"agent{i}")
        made = harness.add_worktree(repo, worktrees[i], branch=f"launch/agent{i}")
        print(f"launch: agent{i} ({name}-agent{i}, {f'GPU {gpu}' if gpu else 'CPU'}) in {worktrees[i]} "
              f"({'new' if made else 'reused'}), log {folder / f'agent{i}.log'}")
    return worktrees


def main(argv: list[str] | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # status lines reach a redirected log as they happen
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    gpus = check_args(args, command)
    repo = checkout_root()
    folder = repo / AGENTS_DIR
    folder.mkdir(exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a scheduler's stop or a closed terminal is a Ctrl-C
        if signal.getsignal(sig) != signal.SIG_IGN:  # ... unless nohup says to ignore it
            signal.signal(sig, signal.default_int_handler)
    hub, agents = None, []
    try:
        worktrees = make_worktrees(repo, folder, gpus, args.name)
        env = dict(os.environ)
        if args.hub:
            url = args.hub.rstrip("/")
        else:
            env["HUB_ADMIN_KEY"] = secrets.token_hex(32)  # a closed hub: registration needs the key, no rate limit
            hub, url = start_local_hub(folder, args.port, env["HUB_ADMIN_KEY"], repo), f"http://127.0.0.1:{args.port}"
            print(f"launch: hub {url}/ (data {folder / 'hub-data'}, log {folder / 'hub.log'})")
        try:
            harness.wait_for_hub(url, hub, folder / "hub.log")
        except TimeoutError as e:
            fail(f"{e}: start one (uv run hub.py) or drop --hub")
        for i, (worktree, gpu) in enumerate(zip(worktrees, gpus)):
            agent_env = {**env, "AGENT_NAME": f"{args.name}-agent{i}", "HUB": url, "CUDA_VISIBLE_DEVICES": gpu}
            log = folder / f"agent{i}.log"
            agents.append(Agent(f"agent{i}", worktree, log, start_agent(command, worktree, log, agent_env)))
        code = watch(agents, hub, folder / "hub.log", args.status_every)
    except RuntimeError as e:  # git refused a worktree, or the local hub stopped at start-up
        fail(str(e))
    except KeyboardInterrupt:
        code = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        harness.stop([agent.proc for agent in agents], STOP_SECONDS)
        harness.stop([hub] if hub else [], STOP_SECONDS)
    print(f"launch: stopped {len(agents)} agents{' and the hub' if hub else ''}; the same command resumes")
    sys.exit(code)


if __name__ == "__main__":
    main()
