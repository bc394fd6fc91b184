"""
The hub: many autoresearch agents on many machines share commits and results through one server.

    uv run hub.py --data hub-data                                  # http://127.0.0.1:8765
    HUB_ADMIN_KEY=KEY uv run hub.py --data hub-data --host 0.0.0.0 # a closed hub for a lab (the key kept out of ps)
    uv run hub.py --data hub-data --revoke alice                   # alice's key stops working, even while serving

It speaks the agenthub edition's API, so the loop in program-hub.md works unchanged. Everything lives under
--data: hub.db (SQLite in WAL mode) indexes agents, commits, channels, posts and results; repo.git (bare) holds
the git objects. No other process to start. GET / is a dashboard for people; every /api/ call but register and
health needs `Authorization: Bearer <api_key>`. The code is in hub/: api.py (routes), core.py (push and limits),
gitrepo.py, store.py (SQLite), results.py (#results posts), dashboard.py.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import uvicorn

from hub.api import TimedH11Protocol, app
from hub.core import Config, Hub
from hub.gitrepo import checkout_files
from hub.store import Store, revoke_key

DEFAULT_PORT = 8765
MAX_CONNECTIONS = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve the autoresearch hub (agenthub API on git + SQLite, dashboard).")
    p.add_argument("--data", type=Path, required=True, help="folder for hub.db and repo.git (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to serve a lab")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--admin-key", default=os.environ.get("HUB_ADMIN_KEY"),
                   help="registration needs this key (default $HUB_ADMIN_KEY; unset: open, rate-limited per address)")
    p.add_argument("--max-bundle-mb", type=float, default=Config.max_bundle_mb)
    p.add_argument("--max-pushes-per-hour", type=int, default=Config.max_pushes_per_hour, help="per agent")
    p.add_argument("--max-posts-per-hour", type=int, default=Config.max_posts_per_hour, help="per agent")
    p.add_argument("--max-registrations-per-hour", type=int, default=Config.max_registrations_per_hour,
                   help="per client address, while registration is open")
    p.add_argument("--max-new-agents-per-hour", type=int, default=Config.max_new_agents_per_hour,
                   help="from all addresses together, while registration is open")
    p.add_argument("--max-uploads-per-agent", type=int, default=Config.max_uploads_per_agent,
                   help="pushes one agent may be sending at once")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="beyond it, new requests get 503")
    p.add_argument("--max-connections-per-address", type=int, default=Config.max_connections_per_address,
                   help="open at once from one client address (--trusted-proxy is not capped); beyond it, closed")
    p.add_argument("--read-timeout", type=float, default=Config.read_timeout,
                   help="seconds before a stalled request header or body is dropped")
    p.add_argument("--first-byte-timeout", type=float, default=Config.first_byte_timeout,
                   help="seconds a connection may stay silent before its request's first byte")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients use for this hub besides loopback, --host and this machine's names")
    p.add_argument("--trusted-proxy", metavar="ADDRESS",
                   help="the reverse proxy whose X-Forwarded-For to believe; unset: none is")
    p.add_argument("--max-object-mb", type=float, default=Config.max_object_mb, help="one git object, expanded")
    p.add_argument("--max-push-mb", type=float, default=Config.max_push_mb, help="one push's objects, expanded")
    p.add_argument("--max-commits-per-push", type=int, default=Config.max_commits_per_push, help="new commits")
    p.add_argument("--max-message-kb", type=float, default=Config.max_message_kb, help="one commit message")
    p.add_argument("--max-diff-kb", type=float, default=Config.max_diff_kb, help="a longer diff is cut here")
    p.add_argument("--max-file-kb", type=float, default=Config.max_file_kb, help="one file of --allowed-paths")
    p.add_argument("--max-objects-per-push", type=int, default=Config.max_objects_per_push,
                   help="in one bundle's pack, before git reads it")
    p.add_argument("--max-git-reads-per-hour", type=int, default=Config.max_git_reads_per_hour,
                   help="diffs and fetches per agent")
    p.add_argument("--max-git-reads-per-agent", type=int, default=Config.max_git_reads_per_agent,
                   help="diffs and fetches one agent may wait on at once")
    p.add_argument("--max-agent-disk-mb", type=float, default=Config.max_agent_disk_mb,
                   help="what one agent's pushes may add to repo.git, in packs")
    p.add_argument("--max-disk-mb", type=float, default=Config.max_disk_mb,
                   help="what all pushes together may add to repo.git (GET /api/health shows the use)")
    p.add_argument("--allowed-paths", nargs="+", default=Config.allowed_paths,
                   help="the files a push may change; every other file must match the baseline's")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", type=full_hash, help="the commit (full hash) whose files pushes must keep "
                          "outside --allowed-paths; an agent pushes it")
    baseline.add_argument("--baseline-from", type=Path, metavar="CHECKOUT", help="take those files from the HEAD "
                          "of this checkout of the project; default, without --baseline: the one hub.py is in")
    p.add_argument("--log-level", default="info", help="uvicorn's log level; 'warning' hides the access log")
    p.add_argument("--revoke", metavar="AGENT", help="revoke this agent's key in --data and exit (the hub may be "
                   "running: the key stops working at once; its commits and posts stay)")
    return p.parse_args(argv)


def baseline_files(args: argparse.Namespace) -> tuple[str, dict | None]:
    """The operator's baseline: a commit (--baseline), or a checkout's HEAD and its files (--baseline-from)."""
    if args.baseline:
        return args.baseline, None
    checkout = args.baseline_from or Path(__file__).resolve().parent
    try:
        return checkout_files(checkout)
    except (subprocess.CalledProcessError, OSError):
        sys.exit(f"hub: {checkout} is not a git checkout with a commit: give --baseline-from CHECKOUT of the "
                 "project, or --baseline COMMIT")


def revoke(data: Path, agent_id: str) -> None:
    if not (data / "hub.db").exists():
        sys.exit(f"hub: no hub.db in {data}: give the --data folder of the hub")
    if not revoke_key(Store(data / "hub.db"), agent_id):
        sys.exit(f"hub: no agent {agent_id!r} in {data / 'hub.db'} (ids are case-sensitive here)")
    print(f"hub: revoked the key of agent {agent_id}", flush=True)


def full_hash(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{40}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a full commit hash: give all 40 hex characters")
    return text


def served_names(host: str, extra: list[str]) -> tuple[str, ...]:
    """The Host names to answer: --host, and for a wildcard address this machine's names and addresses."""
    names = [host, *extra]
    if host in ("0.0.0.0", "::", ""):
        machine = socket.gethostname()
        names += [machine, socket.getfqdn(), *machine_addresses(machine)]
    return tuple(dict.fromkeys(name.lower() for name in names))


def machine_addresses(machine: str) -> list[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(machine, None)]
    except OSError:  # a name that does not resolve: clients then use --allowed-host
        return []


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.revoke:
        revoke(args.data, args.revoke)
        return
    baseline, files = baseline_files(args)
    config = Config(args.data, args.admin_key, args.max_bundle_mb, args.max_pushes_per_hour,
                    args.max_posts_per_hour, args.max_registrations_per_hour, max_object_mb=args.max_object_mb,
                    max_push_mb=args.max_push_mb, max_commits_per_push=args.max_commits_per_push,
                    max_message_kb=args.max_message_kb, max_diff_kb=args.max_diff_kb,
                    allowed_paths=tuple(args.allowed_paths), baseline=baseline, baseline_files=files,
                    max_new_agents_per_hour=args.max_new_agents_per_hour,
                    max_uploads_per_agent=args.max_uploads_per_agent, read_timeout=args.read_timeout,
                    first_byte_timeout=args.first_byte_timeout,
                    max_connections_per_address=args.max_connections_per_address, max_file_kb=args.max_file_kb,
                    max_objects_per_push=args.max_objects_per_push,
                    max_git_reads_per_hour=args.max_git_reads_per_hour,
                    max_git_reads_per_agent=args.max_git_reads_per_agent, max_agent_disk_mb=args.max_agent_disk_mb,
                    max_disk_mb=args.max_disk_mb,
                    allowed_hosts=served_names(args.host, args.allowed_host))
    app.state.hub = Hub(config)  # opens the index and the repository and recovers from any kill before serving
    access = "closed (admin key)" if config.admin_key else f"open ({config.max_registrations_per_hour}/hour/address)"
    print(f"hub: data {config.data.resolve()}, registration {access}, http://{args.host}:{args.port}/", flush=True)
    source = f"the files of {args.baseline_from or 'this checkout'} at" if files is not None else "commit"
    print(f"hub: baseline {source} {baseline}: pushes may change only {', '.join(config.allowed_paths)}", flush=True)
    print(f"hub: answers to Host {', '.join(config.allowed_hosts)} and loopback", flush=True)
    TimedH11Protocol.read_timeout = config.read_timeout
    TimedH11Protocol.first_byte_timeout = config.first_byte_timeout
    TimedH11Protocol.max_per_address = config.max_connections_per_address
    TimedH11Protocol.uncapped = frozenset([args.trusted_proxy] if args.trusted_proxy else [])
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http=TimedH11Protocol,
                limit_concurrency=args.max_connections, proxy_headers=args.trusted_proxy is not None,
                forwarded_allow_ips=args.trusted_proxy)


if __name__ == "__main__":
    main()
