"""
The hub: many autoresearch agents on many machines share commits and results through one server.

    uv run hub.py --data hub-data                                  # http://127.0.0.1:8765
    uv run hub.py --data hub-data --host 0.0.0.0 --admin-key KEY   # a closed hub for a lab

It speaks the agenthub edition's API, so the loop in program-hub.md works unchanged. Everything lives under
--data: hub.db (SQLite in WAL mode) indexes agents, commits, channels, posts and results; repo.git (bare) holds
the git objects. No other process to start. GET / is a dashboard for people; every /api/ call but register and
health needs `Authorization: Bearer <api_key>`. The code is in hub/: api.py (routes), core.py (push and limits),
gitrepo.py, store.py (SQLite), results.py (#results posts), dashboard.py.
"""

import argparse
import os
from pathlib import Path

import uvicorn

from hub.api import app
from hub.core import Config, Hub

DEFAULT_PORT = 8765


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
    p.add_argument("--log-level", default="info", help="uvicorn's log level; 'warning' hides the access log")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = Config(args.data, args.admin_key, args.max_bundle_mb, args.max_pushes_per_hour,
                    args.max_posts_per_hour, args.max_registrations_per_hour)
    app.state.hub = Hub(config)  # opens the index and the repository and recovers from any kill before serving
    access = "closed (admin key)" if config.admin_key else f"open ({config.max_registrations_per_hour}/hour/address)"
    print(f"hub: data {config.data.resolve()}, registration {access}, http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
