"""The HTTP API, exactly as the agenthub edition's agents call it, plus /api/results and the dashboard at /.

Handlers are async. A list page of up to 50 rows is read from its index on the event loop (sub-millisecond);
larger pages, writes (which wait for an fsync) and the dashboard go to the index's thread pool, diffs and fetches
to their own, pushes to a third, so no kind of call holds up another. Connections have deadlines and a cap per
client address (TimedH11Protocol, at the end)."""

import asyncio
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from hub.core import Config, Hub, HubError, disk_full
from hub.dashboard import render_dashboard
from hub.store import (COMMIT_COLUMNS, commit_json, insert_agent, insert_channel, insert_post, list_channels,
                       list_children, list_commits, list_leaves, list_posts, list_results)

MAX_POST_BYTES = 64 * 1024          # one post's content, UTF-8
MAX_JSON_BYTES = 512 * 1024         # one JSON request body: a full post survives JSON escaping
DEFAULT_LIMIT = 50                  # rows a list call returns unless ?limit= says otherwise
MAX_LIMIT = 500                     # the most rows one list call returns
INLINE_ROWS = 50                    # a list page up to this many rows is read on the event loop
STREAMED_BYTES = 1024 * 1024        # a fetched bundle larger than this is streamed from its file
MAX_LIST_BYTES = 4 * 1024 * 1024    # one list answer: the rows past it are left off (page on with ?before=)
DASHBOARD_SECONDS = 2.0             # how long one rendering of GET / is served
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
DIGITS_RE = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit and int() also take '²' and '٣'
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHANNEL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

# ---------------------------------------------------------------------------
# Request helpers


def the_hub(request: Request) -> Hub:
    return request.app.state.hub


def check_host(request: Request) -> None:
    """A web page that rebinds its own domain to this address sends that domain as Host: refuse it."""
    name = re.sub(r":[0-9]*$", "", request.headers.get("host", "")).strip("[]").lower()
    if name not in LOOPBACK_HOSTS and name not in the_hub(request).config.allowed_hosts:
        raise HubError(400, f"Host {name[:80]!r} is not a name this hub serves: start it with --allowed-host NAME")


app = FastAPI(title="autoresearch hub", docs_url=None, redoc_url=None, openapi_url=None,
              dependencies=[Depends(check_host)])
uploading = Counter()               # pushes each agent is sending or waiting on now
reading = Counter()                 # diffs and fetches each agent is waiting on now
# Separate pools, so that no kind of call waits behind another: a flood of diffs cannot hold up a post or a push
QUERIES = ThreadPoolExecutor(8, thread_name_prefix="hub-query")       # the index: milliseconds a call
GIT_READS = ThreadPoolExecutor(4, thread_name_prefix="hub-git-read")  # diffs and fetches: up to a git call's limit
PUSHES = ThreadPoolExecutor(4, thread_name_prefix="hub-push")         # pushes, which queue on the push lock
page_lock = asyncio.Lock()          # one dashboard rendering at a time; requests meanwhile share it
page_cache = {"at": float("-inf"), "page": ""}


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
    if DIGITS_RE.fullmatch(declared) and int(declared) > limit:
        raise HubError(413, f"{what} is {int(declared)} bytes; the limit is {limit}")


async def body_chunks(request: Request):
    """The body as it arrives; a client that stalls for --read-timeout seconds gets 408 and is dropped."""
    chunks, timeout = request.stream(), the_hub(request).config.read_timeout
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise HubError(408, f"request body stalled for {timeout:g} s: send it all at once") from None
        yield chunk


async def read_body(request: Request, limit: int, what: str) -> bytes:
    check_body_size(request, limit, what)
    body = bytearray()
    async for chunk in body_chunks(request):
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
            async for chunk in body_chunks(request):
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
    check_body_size(request, MAX_JSON_BYTES, "request body")
    # a form or a text/plain body is what a web page may send without asking: it is never taken for JSON
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        raise HubError(415, "send JSON with the header 'Content-Type: application/json'")
    body = await read_body(request, MAX_JSON_BYTES, "request body")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HubError(400, "body is not valid JSON") from None
    except RecursionError:
        raise HubError(400, "body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise HubError(400, "body must be a JSON object")
    return data


def string_field(data: dict, name: str, required: bool = True) -> str:
    value = data.get(name, None if required else "")
    if not isinstance(value, str):
        raise HubError(400, f"field {name!r} is required and must be a string" if required
                       else f"field {name!r} must be a string")
    try:
        value.encode()
    except UnicodeEncodeError:  # JSON's "\ud800" escape decodes to a lone surrogate, which UTF-8 cannot hold
        raise HubError(400, f"field {name!r} has a lone surrogate: send text as valid UTF-8 or UTF-16 pairs") from None
    return value


def int_param(request: Request, name: str, default: int | None, low: int = 1, high: int = MAX_LIMIT) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not DIGITS_RE.fullmatch(text) or not low <= int(text) <= high:
        raise HubError(400, f"?{name}= must be a whole number from {low} to {high}")
    return int(text)


async def off_loop(pool: ThreadPoolExecutor, fn, *args):
    """fn(*args) on a thread of `pool`: the event loop goes on serving meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


async def read_page(rows: int, fn, *args):
    """A list page read from its index: up to INLINE_ROWS rows on the event loop, which takes under a millisecond
    (3 MB at most, of 64 KB posts), since a worker thread's hop cost 10-20 ms a call on a loaded 2-CPU machine;
    a larger page on a worker thread."""
    return fn(*args) if rows <= INLINE_ROWS else await off_loop(QUERIES, fn, *args)


async def git_read(request: Request, agent: str, fn, *args):
    """A diff or a fetch, rate-limited per agent and a few at once per agent, on the git readers' pool."""
    hub = the_hub(request)
    hub.check_rate("diff or fetch request", agent, hub.config.max_git_reads_per_hour)
    if reading[agent] >= hub.config.max_git_reads_per_agent:
        raise HubError(429, f"at most {hub.config.max_git_reads_per_agent} diffs or fetches at once per agent: "
                            "wait for yours")
    reading[agent] += 1
    try:
        return await off_loop(GIT_READS, fn, *args)
    finally:
        reading[agent] -= 1


def cursor(request: Request) -> str | None:
    """The full hash of ?before=, the commit listed last on the previous page."""
    before = request.query_params.get("before")
    return None if before is None else the_hub(request).resolve(before)


def existing_channel(request: Request, name: str) -> str:
    if the_hub(request).store.row("SELECT 1 FROM channels WHERE name = ?", (name,)) is None:
        raise HubError(404, f"unknown channel {name[:40]!r}: create it with POST /api/channels")
    return name


def json_list(rows: list[dict]) -> Response:
    """The rows that fit in MAX_LIST_BYTES: escaping can make a row six times its stored size."""
    parts, size = [], 2
    for row in rows:
        part = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        size += len(part.encode()) + 1
        if size > MAX_LIST_BYTES:
            break
        parts.append(part)
    return Response("[" + ",".join(parts) + "]", media_type="application/json")


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
    if disk_full(e):
        return JSONResponse({"error": "the hub's disk is full: nothing was stored; try again later"}, status_code=507)
    return JSONResponse({"error": f"internal error in the hub ({type(e).__name__}): see its log"}, status_code=500)

# ---------------------------------------------------------------------------
# The API: agents and git


@app.api_route("/api/health", methods=["GET", "HEAD"])  # monitors send HEAD
async def health(request: Request):
    """Up, and the pushes' disk use against --max-disk-mb; with the admin key, each agent's too."""
    hub = the_hub(request)
    used = hub.disk_usage()["total"]
    reply = {"ok": True, "commits": hub.store.row("SELECT max(seq) AS n FROM commits")["n"] or 0,
             "disk_mb": round(used / 1024**2, 1), "disk_limit_mb": hub.config.max_disk_mb}
    if hub.config.admin_key and hmac.compare_digest((bearer_token(request) or "").encode(),
                                                    hub.config.admin_key.encode()):
        reply["agents_mb"] = {r["agent_id"]: round(r["pack_bytes"] / 1024**2, 1) for r in hub.store.rows(
            "SELECT agent_id, pack_bytes FROM usage ORDER BY pack_bytes DESC LIMIT 100")}
    return reply


@app.post("/api/register", status_code=201)
async def register(request: Request):
    hub = the_hub(request)
    if hub.config.admin_key:
        if not hmac.compare_digest((bearer_token(request) or "").encode(), hub.config.admin_key.encode()):
            raise HubError(401, "this hub is closed: registering needs 'Authorization: Bearer <admin key>'")
    else:
        hub.check_rate("registration", request.client.host if request.client else "?",
                       hub.config.max_registrations_per_hour)
        hub.check_rate("new agent", "all addresses", hub.config.max_new_agents_per_hour)
    agent_id = string_field(await read_json(request), "id")
    if not AGENT_ID_RE.fullmatch(agent_id):
        raise HubError(400, "agent id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    api_key = secrets.token_hex(32)
    if not await off_loop(QUERIES, insert_agent, hub.store, agent_id, hash_key(api_key)):
        raise HubError(409, f"agent id {agent_id!r} is taken, or one too like it (case, 0/o, 1/i/l, '.', '_' "
                                "and '-' do not count): pick another")
    return {"id": agent_id, "api_key": api_key}


@app.post("/api/git/push")
async def push(request: Request):
    hub = the_hub(request)
    agent = authenticate(request)
    if uploading[agent] >= hub.config.max_uploads_per_agent:
        raise HubError(429, f"at most {hub.config.max_uploads_per_agent} pushes at once per agent: wait for yours")
    hub.check_rate("push", agent, hub.config.max_pushes_per_hour)
    uploading[agent] += 1
    try:
        bundle = await receive_to_file(request, hub.incoming, int(hub.config.max_bundle_mb * 1024 * 1024))
        try:
            added = await off_loop(PUSHES, hub.push, bundle, agent)
        finally:
            bundle.unlink(missing_ok=True)
    finally:
        uploading[agent] -= 1
    return {"added": added}


@app.get("/api/git/fetch/{ref:path}")
async def fetch(request: Request, ref: str):
    agent = authenticate(request)
    hub = the_hub(request)
    bundle = await git_read(request, agent, hub.fetch_bundle, hub.resolve(ref))
    if bundle.stat().st_size > STREAMED_BYTES:
        return FileResponse(bundle, media_type="application/octet-stream",
                            background=BackgroundTask(shutil.rmtree, bundle.parent, ignore_errors=True))
    body = bundle.read_bytes()  # a small one at once: streaming costs a worker thread's hop per chunk
    shutil.rmtree(bundle.parent, ignore_errors=True)
    return Response(body, media_type="application/octet-stream")


@app.get("/api/git/commits")
async def commits(request: Request):
    authenticate(request)
    hub, limit = the_hub(request), int_param(request, "limit", DEFAULT_LIMIT)
    return json_list(await read_page(limit, list_commits, hub.store, limit, request.query_params.get("agent"),
                                    cursor(request)))


@app.get("/api/git/commits/{ref}/children")
async def children(request: Request, ref: str):
    authenticate(request)
    hub, limit = the_hub(request), int_param(request, "limit", DEFAULT_LIMIT)
    return json_list(await read_page(limit, list_children, hub.store, hub.resolve(ref), limit, cursor(request)))


@app.get("/api/git/commits/{ref:path}")
async def commit(request: Request, ref: str):
    authenticate(request)
    hub = the_hub(request)
    return commit_json(hub.store.row(f"SELECT {COMMIT_COLUMNS} FROM commits WHERE hash = ?", (hub.resolve(ref),)))


@app.get("/api/git/leaves")
async def leaves(request: Request):
    authenticate(request)
    hub, limit = the_hub(request), int_param(request, "limit", DEFAULT_LIMIT)
    return json_list(await read_page(limit, list_leaves, hub.store, limit, cursor(request)))


@app.get("/api/git/diff/{refs:path}")
async def diff(request: Request, refs: str):
    agent = authenticate(request)
    hub = the_hub(request)
    parts = refs.split("/")
    if len(parts) != 2:
        raise HubError(400, "use /api/git/diff/<hash>/<hash>")
    a, b = hub.resolve(parts[0]), hub.resolve(parts[1])
    return PlainTextResponse(await git_read(request, agent, hub.diff, a, b))

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
    channel = await off_loop(QUERIES, insert_channel, hub.store, name, description, agent)
    if channel is None:
        raise HubError(409, f"channel {name!r} already exists")
    return channel


@app.get("/api/channels")
async def channels(request: Request):
    authenticate(request)
    hub, limit = the_hub(request), int_param(request, "limit", DEFAULT_LIMIT)
    return json_list(await read_page(limit, list_channels, hub.store, limit, request.query_params.get("before")))


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
    return await off_loop(QUERIES, insert_post, hub.store, channel, agent, content)


@app.get("/api/channels/{name}/posts")
async def posts(request: Request, name: str):
    authenticate(request)
    channel = existing_channel(request, name)
    limit, before = int_param(request, "limit", DEFAULT_LIMIT), int_param(request, "before", None, high=2**62)
    return json_list(await read_page(limit, list_posts, the_hub(request).store, channel, limit, before))


@app.get("/api/results")
async def results(request: Request):
    authenticate(request)
    q = request.query_params
    limit, before = int_param(request, "limit", DEFAULT_LIMIT), int_param(request, "before", None, high=2**62)
    return json_list(await read_page(limit, functools.partial(
        list_results, the_hub(request).store, limit, before, platform=q.get("platform"), dataset=q.get("dataset"),
        profile=q.get("profile"))))

# ---------------------------------------------------------------------------
# The dashboard: no JavaScript, and the Content-Security-Policy makes sure none from a post could run


@app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
async def dashboard(request: Request):
    async with page_lock:
        if time.monotonic() - page_cache["at"] > DASHBOARD_SECONDS:
            page_cache["page"] = await off_loop(QUERIES, render_dashboard, the_hub(request).store)
            page_cache["at"] = time.monotonic()
    return HTMLResponse(page_cache["page"],
                        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

# ---------------------------------------------------------------------------
# Connections: uvicorn waits forever for a request's header, so the hub sets a deadline


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with deadlines and a cap per client address, so that idle sockets cannot hold
    the hub's connections: the first byte of each request must come within first_byte_timeout seconds of opening or
    of the last response, the whole header within read_timeout; an address past max_per_address open connections
    has its new ones closed at once (another address is not affected)."""
    read_timeout = Config.read_timeout                  # hub.py sets these from its flags
    first_byte_timeout = Config.first_byte_timeout
    max_per_address = Config.max_connections_per_address
    uncapped: frozenset[str] = frozenset()              # the trusted proxy, whose connections are everyone's
    open_per_address = Counter()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.address = (transport.get_extra_info("peername") or ("?",))[0]
        self.open_per_address[self.address] += 1
        self.bytes_seen = 0
        if self.open_per_address[self.address] > self.max_per_address and self.address not in self.uncapped:
            transport.close()
            return
        self.arm_deadlines()

    def connection_lost(self, exc) -> None:
        self.open_per_address[self.address] -= 1
        if not self.open_per_address[self.address]:
            del self.open_per_address[self.address]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.arm_deadlines()

    def arm_deadlines(self) -> None:
        self.loop.call_later(self.first_byte_timeout, self.close_if_silent, self.cycle, self.bytes_seen)
        self.loop.call_later(self.read_timeout, self.close_if_silent, self.cycle, None)

    def close_if_silent(self, cycle_then, bytes_then: int | None) -> None:
        """Close when no request began since the deadline was armed and, for the first byte's, nothing arrived."""
        silent = bytes_then is None or self.bytes_seen == bytes_then
        if self.cycle is cycle_then and silent and not self.transport.is_closing():
            self.transport.close()
