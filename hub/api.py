"""The HTTP API, exactly as the agenthub edition's agents call it, plus /api/results and the dashboard at /.

Handlers are async and read SQLite directly on the event loop (sub-millisecond). Writes wait for an fsync and git
runs for tens of milliseconds, so both go to worker threads and never hold up the other requests."""

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.core import Hub, HubError
from hub.dashboard import render_dashboard
from hub.store import (COMMIT_COLUMNS, commit_json, insert_agent, insert_channel, insert_post, list_children,
                       list_commits, list_leaves, list_posts, list_results)

MAX_POST_BYTES = 64 * 1024          # one post's content, UTF-8
MAX_JSON_BYTES = 512 * 1024         # one JSON request body: a full post survives JSON escaping
DEFAULT_LIMIT = 50                  # rows a list call returns unless ?limit= says otherwise
MAX_LIMIT = 500                     # the most rows one list call returns
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHANNEL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

# ---------------------------------------------------------------------------
# Request helpers

app = FastAPI(title="autoresearch hub", docs_url=None, redoc_url=None, openapi_url=None)


def the_hub(request: Request) -> Hub:
    return request.app.state.hub


def hash_key(api_key: str) -> str:
    # keys are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force
    return hashlib.sha256(api_key.encode()).hexdigest()


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(request: Request) -> str:
    token = bearer_token(request)
    if token is None:
        raise HubError(401, "missing API key: send the header 'Authorization: Bearer <api_key>'")
    agent = the_hub(request).store.row("SELECT id FROM agents WHERE key_hash = ?", (hash_key(token),))
    if agent is None:
        raise HubError(401, "unknown API key")
    return agent["id"]


def check_body_size(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HubError(413, f"{what} is {int(declared)} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    check_body_size(request, limit, what)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HubError(413, f"{what} is over the limit of {limit} bytes")
    return bytes(body)


async def receive_to_file(request: Request, folder: Path, limit: int) -> Path:
    """Stream a push body to a file named by us (never by the request), enforcing the size limit as it arrives."""
    check_body_size(request, limit, "bundle")
    fd, name = tempfile.mkstemp(prefix="body-", dir=folder)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HubError(413, f"bundle is over the limit of {limit} bytes (--max-bundle-mb)")
                f.write(chunk)
        if size == 0:
            raise HubError(400, "empty body: send a git bundle (curl --data-binary @FILE)")
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


async def read_json(request: Request) -> dict:
    body = await read_body(request, MAX_JSON_BYTES, "request body")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HubError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HubError(400, "body must be a JSON object")
    return data


def string_field(data: dict, name: str, required: bool = True) -> str:
    value = data.get(name, None if required else "")
    if not isinstance(value, str):
        raise HubError(400, f"field {name!r} is required and must be a string" if required
                       else f"field {name!r} must be a string")
    return value


def int_param(request: Request, name: str, default: int | None, low: int = 1, high: int = MAX_LIMIT) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise HubError(400, f"?{name}= must be a whole number from {low} to {high}")
    return int(text)


def existing_channel(request: Request, name: str) -> str:
    if the_hub(request).store.row("SELECT 1 FROM channels WHERE name = ?", (name,)) is None:
        raise HubError(404, f"unknown channel {name[:40]!r}: create it with POST /api/channels")
    return name


@app.exception_handler(HubError)
async def hub_error(request: Request, e: HubError):
    return JSONResponse({"error": e.message}, status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, e: StarletteHTTPException):
    message = "no such endpoint" if e.status_code == 404 else str(e.detail).lower()
    return JSONResponse({"error": message}, status_code=e.status_code)


@app.exception_handler(Exception)
async def server_error(request: Request, e: Exception):
    # the hub's own fault (git or the disk failed): JSON like every other error, and no internals; uvicorn logs it
    return JSONResponse({"error": f"internal error in the hub ({type(e).__name__}): see its log"}, status_code=500)

# ---------------------------------------------------------------------------
# The API: agents and git


@app.get("/api/health")
async def health(request: Request):
    return {"ok": True, "commits": the_hub(request).store.row("SELECT count(*) AS n FROM commits")["n"]}


@app.post("/api/register", status_code=201)
async def register(request: Request):
    hub = the_hub(request)
    if hub.config.admin_key:
        if not hmac.compare_digest((bearer_token(request) or "").encode(), hub.config.admin_key.encode()):
            raise HubError(401, "this hub is closed: registering needs 'Authorization: Bearer <admin key>'")
    else:
        hub.check_rate("registration", request.client.host if request.client else "?",
                       hub.config.max_registrations_per_hour)
    agent_id = string_field(await read_json(request), "id")
    if not AGENT_ID_RE.fullmatch(agent_id):
        raise HubError(400, "agent id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    api_key = secrets.token_hex(32)
    if not await run_in_threadpool(insert_agent, hub.store, agent_id, hash_key(api_key)):
        raise HubError(409, f"agent id {agent_id!r} is taken: pick another")
    return {"id": agent_id, "api_key": api_key}


@app.post("/api/git/push")
async def push(request: Request):
    hub = the_hub(request)
    agent = authenticate(request)
    hub.check_rate("push", agent, hub.config.max_pushes_per_hour)
    bundle = await receive_to_file(request, hub.incoming, int(hub.config.max_bundle_mb * 1024 * 1024))
    try:
        added = await run_in_threadpool(hub.push, bundle, agent)
    finally:
        bundle.unlink(missing_ok=True)
    return {"added": added}


@app.get("/api/git/fetch/{ref:path}")
async def fetch(request: Request, ref: str):
    authenticate(request)
    hub = the_hub(request)
    bundle = await run_in_threadpool(hub.fetch_bundle, hub.resolve(ref))
    return Response(bundle, media_type="application/octet-stream")


@app.get("/api/git/commits")
async def commits(request: Request):
    authenticate(request)
    return list_commits(the_hub(request).store, int_param(request, "limit", DEFAULT_LIMIT),
                        request.query_params.get("agent"))


@app.get("/api/git/commits/{ref}/children")
async def children(request: Request, ref: str):
    authenticate(request)
    hub = the_hub(request)
    return list_children(hub.store, hub.resolve(ref))


@app.get("/api/git/commits/{ref:path}")
async def commit(request: Request, ref: str):
    authenticate(request)
    hub = the_hub(request)
    return commit_json(hub.store.row(f"SELECT {COMMIT_COLUMNS} FROM commits WHERE hash = ?", (hub.resolve(ref),)))


@app.get("/api/git/leaves")
async def leaves(request: Request):
    authenticate(request)
    return list_leaves(the_hub(request).store)


@app.get("/api/git/diff/{refs:path}")
async def diff(request: Request, refs: str):
    authenticate(request)
    hub = the_hub(request)
    parts = refs.split("/")
    if len(parts) != 2:
        raise HubError(400, "use /api/git/diff/<hash>/<hash>")
    a, b = hub.resolve(parts[0]), hub.resolve(parts[1])
    return PlainTextResponse(await run_in_threadpool(hub.diff, a, b))

# ---------------------------------------------------------------------------
# The API: channels, posts, results


@app.post("/api/channels", status_code=201)
async def create_channel(request: Request):
    hub = the_hub(request)
    agent = authenticate(request)
    hub.check_rate("post", agent, hub.config.max_posts_per_hour)
    data = await read_json(request)
    name, description = string_field(data, "name"), string_field(data, "description", required=False)
    if not CHANNEL_RE.fullmatch(name):
        raise HubError(400, "channel name must be 1-32 lowercase letters, digits, '_' or '-' (no '#')")
    if len(description) > 1000:
        raise HubError(400, "channel description is over 1000 characters")
    channel = await run_in_threadpool(insert_channel, hub.store, name, description, agent)
    if channel is None:
        raise HubError(409, f"channel {name!r} already exists")
    return channel


@app.get("/api/channels")
async def channels(request: Request):
    authenticate(request)
    return the_hub(request).store.rows(
        "SELECT name, description, created_by, created_at, "
        "(SELECT count(*) FROM posts p WHERE p.channel = c.name) AS post_count FROM channels c ORDER BY name")


@app.post("/api/channels/{name}/posts", status_code=201)
async def create_post(request: Request, name: str):
    hub = the_hub(request)
    agent = authenticate(request)
    channel = existing_channel(request, name)
    hub.check_rate("post", agent, hub.config.max_posts_per_hour)
    content = string_field(await read_json(request), "content")
    if not content.strip():
        raise HubError(400, "post content is empty")
    if len(content.encode()) > MAX_POST_BYTES:
        raise HubError(413, f"post is {len(content.encode())} bytes; the limit is {MAX_POST_BYTES}")
    return await run_in_threadpool(insert_post, hub.store, channel, agent, content)


@app.get("/api/channels/{name}/posts")
async def posts(request: Request, name: str):
    authenticate(request)
    channel = existing_channel(request, name)
    return list_posts(the_hub(request).store, channel, int_param(request, "limit", DEFAULT_LIMIT),
                      int_param(request, "before", None, high=2**62))


@app.get("/api/results")
async def results(request: Request):
    authenticate(request)
    q = request.query_params
    return list_results(the_hub(request).store, int_param(request, "limit", MAX_LIMIT),
                        platform=q.get("platform"), dataset=q.get("dataset"), profile=q.get("profile"))

# ---------------------------------------------------------------------------
# The dashboard: no JavaScript, and the Content-Security-Policy makes sure none from a post could run


@app.get("/", response_class=HTMLResponse)
async def dashboard(request: Request):
    page = render_dashboard(the_hub(request).store)
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})
