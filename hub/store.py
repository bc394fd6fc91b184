"""The SQLite index: agents, commits and their edges, channels, posts and parsed results. It is the source of truth
for what the hub shows: a commit is visible once its row is committed here, never before."""

import json
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from hub.results import RESULTS_CHANNEL, parse_result


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- push order: newest first is ORDER BY seq DESC
    hash TEXT NOT NULL UNIQUE,
    parents TEXT NOT NULL,                   -- space-separated, first parent first
    message TEXT NOT NULL,
    author_time TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    pushed_at TEXT NOT NULL,
    depth INTEGER NOT NULL                   -- commits above the root with a kept result by their pusher
);
CREATE INDEX IF NOT EXISTS commits_agent ON commits (agent_id, seq);
CREATE TABLE IF NOT EXISTS edges (
    parent TEXT NOT NULL,
    child TEXT NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS posts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL REFERENCES channels (name),
    agent_id TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_channel ON posts (channel, id);
CREATE TABLE IF NOT EXISTS results (
    post_id INTEGER PRIMARY KEY REFERENCES posts (id),
    agent_id TEXT NOT NULL,
    commit_prefix TEXT NOT NULL,
    platform TEXT NOT NULL,
    dataset TEXT NOT NULL,
    profile TEXT NOT NULL,
    val_bpb REAL,                            -- NULL for a crash
    vram_gb REAL,
    status TEXT NOT NULL,                    -- keep, discard or crash
    description TEXT NOT NULL,
    fields TEXT NOT NULL,                    -- any other key:value fields, as JSON
    created_at TEXT NOT NULL,
    commit_hash TEXT                         -- the poster's own pushed commit it names; NULL: unverified
);
CREATE INDEX IF NOT EXISTS results_platform ON results (platform, val_bpb);
CREATE INDEX IF NOT EXISTS results_prefix ON results (commit_prefix);
"""
VERIFIED_INDEX = "CREATE INDEX IF NOT EXISTS results_commit ON results (commit_hash)"
# Lists are read in their own order straight from an index, so a page costs its rows, not the table
RANK = "val_bpb IS NULL, commit_hash IS NULL, val_bpb, post_id"  # results, best first
LIST_INDEXES = f"""
CREATE INDEX IF NOT EXISTS commits_leaves ON commits (depth DESC, seq DESC) WHERE leaf;
CREATE INDEX IF NOT EXISTS results_rank ON results ({RANK});
CREATE INDEX IF NOT EXISTS results_platform_rank ON results (platform, {RANK});
CREATE TABLE IF NOT EXISTS usage (
    agent_id TEXT PRIMARY KEY,
    pack_bytes INTEGER NOT NULL                -- the packs its pushes added to repo.git
);
"""


class Store:
    """The SQLite index, one connection per thread (sqlite3 connections must not cross threads)."""

    def __init__(self, path: Path):
        self.path = path
        self.local = threading.local()
        db = self.conn()
        db.executescript(SCHEMA)
        if "commit_hash" not in {column["name"] for column in db.execute("PRAGMA table_info(results)")}:
            self.add_commit_hash(db)
        db.execute(VERIFIED_INDEX)
        if "leaf" not in {column["name"] for column in db.execute("PRAGMA table_info(commits)")}:
            self.add_leaf(db)
        db.executescript(LIST_INDEXES)

    @staticmethod
    def add_leaf(db: sqlite3.Connection) -> None:
        """A hub.db from before leaves were kept as a column: mark the commits nothing builds on."""
        db.execute("ALTER TABLE commits ADD COLUMN leaf INTEGER NOT NULL DEFAULT 1")
        db.execute("UPDATE commits SET leaf = 0 WHERE hash IN (SELECT parent FROM edges)")

    @staticmethod
    def add_commit_hash(db: sqlite3.Connection) -> None:
        """A hub.db from before results were checked: verify its results as insert_post would have."""
        db.execute("ALTER TABLE results ADD COLUMN commit_hash TEXT")
        for post_id, prefix, agent_id in db.execute("SELECT post_id, commit_prefix, agent_id FROM results").fetchall():
            db.execute("UPDATE results SET commit_hash = ? WHERE post_id = ?", (own_commit(db, prefix, agent_id), post_id))

    def conn(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives a power cut, not just a kill
            db.execute("PRAGMA foreign_keys=ON")
            self.local.db = db
        return db

    @contextmanager
    def transaction(self):
        db = self.conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def rows(self, sql: str, args=()) -> list[dict]:
        return [dict(row) for row in self.conn().execute(sql, args)]

    def row(self, sql: str, args=()) -> dict | None:
        found = self.conn().execute(sql, args).fetchone()
        return dict(found) if found else None

# ---------------------------------------------------------------------------
# Reads the API and the dashboard share, and the one write that parses results


COMMIT_COLUMNS = "hash, parents, message, author_time, agent_id, pushed_at, depth"
MAX_SUBJECT = 200  # characters of a commit message in list calls


def commit_json(row: dict) -> dict:
    parents = row["parents"].split()
    return {"hash": row["hash"], "parent_hash": parents[0] if parents else None, "parents": parents,
            "message": row["message"], "agent_id": row["agent_id"], "author_time": row["author_time"],
            "created_at": row["pushed_at"], "depth": row["depth"]}


def commit_subject_json(row: dict) -> dict:
    """Lists carry a message's first line, cut short: agents read them every loop."""
    return {**commit_json(row), "message": row["message"].split("\n", 1)[0][:MAX_SUBJECT]}


def list_commits(store: Store, limit: int, agent: str | None = None, before: str | None = None) -> list[dict]:
    """Newest first; `before`: the page after that commit."""
    where, args = ("AND agent_id = ?", (agent,)) if agent else ("", ())
    rows = store.rows(f"SELECT {COMMIT_COLUMNS} FROM commits WHERE seq < ? {where} ORDER BY seq DESC LIMIT ?",
                      (seq_of(store, before), *args, limit))
    return [commit_subject_json(r) for r in rows]


def list_leaves(store: Store, limit: int, before: str | None = None) -> list[dict]:
    """The commits nothing builds on, best-ranked first: deepest (most improvements), then newest."""
    after = store.row("SELECT depth, seq FROM commits WHERE hash = ?", (before,)) if before else None
    depth, seq = (after["depth"], after["seq"]) if after else (2**62, 2**62)
    rows = store.rows(f"SELECT {COMMIT_COLUMNS} FROM commits WHERE leaf AND (depth, seq) < (?, ?) "
                      "ORDER BY depth DESC, seq DESC LIMIT ?", (depth, seq, limit))
    return [commit_subject_json(r) for r in rows]


def list_children(store: Store, sha: str, limit: int, before: str | None = None) -> list[dict]:
    """Newest first; `before`: the page after that commit."""
    rows = store.rows(f"SELECT {COMMIT_COLUMNS} FROM commits WHERE hash IN (SELECT child FROM edges WHERE parent = ?) "
                      "AND seq < ? ORDER BY seq DESC LIMIT ?", (sha, seq_of(store, before), limit))
    return [commit_subject_json(r) for r in rows]


def seq_of(store: Store, sha: str | None) -> int:
    return 2**62 if sha is None else store.row("SELECT seq FROM commits WHERE hash = ?", (sha,))["seq"]


def list_channels(store: Store, limit: int, before: str | None = None) -> list[dict]:
    """By name; `before`: the page after that name."""
    return store.rows("SELECT name, description, created_by, created_at, (SELECT count(*) FROM posts p "
                      "WHERE p.channel = c.name) AS post_count FROM channels c WHERE name > ? ORDER BY name LIMIT ?",
                      (before or "", limit))


def list_posts(store: Store, channel: str, limit: int, before: int | None = None) -> list[dict]:
    return store.rows("SELECT id, channel, agent_id, content, created_at FROM posts "
                      "WHERE channel = ? AND id < ? ORDER BY id DESC LIMIT ?",
                      (channel, before if before is not None else 2**62, limit))


def result_json(row: dict) -> dict:
    return {"post_id": row["post_id"], "agent_id": row["agent_id"], "commit": row["commit_prefix"],
            "platform": row["platform"], "dataset": row["dataset"], "profile": row["profile"],
            "val_bpb": row["val_bpb"], "vram_gb": row["vram_gb"], "status": row["status"],
            "description": row["description"], "fields": json.loads(row["fields"]), "created_at": row["created_at"],
            "verified": row["commit_hash"] is not None}


RESULT_COLUMNS = ("post_id, agent_id, commit_prefix, platform, dataset, profile, val_bpb, vram_gb, status, "
                  "description, fields, created_at, commit_hash")


def list_results(store: Store, limit: int, before: int | None = None, **filters: str | None) -> list[dict]:
    """Best first: lowest val_bpb, crashes last, and verified results (the poster pushed the commit) before the
    rest, so a number posted for someone else's commit or for no commit never tops the table. `before`: the page
    after that post's result."""
    used = {k: v for k, v in filters.items() if v is not None}
    where = " AND ".join(f"{k} = ?" for k in used) or "1"
    after, args = "", ()
    if before is not None:
        after = ("AND (val_bpb IS NULL, commit_hash IS NULL, coalesce(val_bpb, 0), post_id) > (SELECT val_bpb IS "
                 "NULL, commit_hash IS NULL, coalesce(val_bpb, 0), post_id FROM results WHERE post_id = ?)")
        args = (before,)
    rows = store.rows(f"SELECT {RESULT_COLUMNS} FROM results WHERE {where} {after} ORDER BY {RANK} LIMIT ?",
                      (*used.values(), *args, limit))
    return [result_json(r) for r in rows]


LOOK_ALIKE = str.maketrans("01i", "oll", "._-")  # after lower(): 0/o, 1/i/l one letter; separators dropped


def id_skeleton(agent_id: str) -> str:
    """What an id looks like at a glance: `Alice`, `a1ice` and `alice_` are all `allce`."""
    return agent_id.lower().translate(LOOK_ALIKE)


def insert_agent(store: Store, agent_id: str, key_hash: str) -> bool:
    """False when the id, or one that looks like it, is taken."""
    skeleton = id_skeleton(agent_id)
    with store.transaction() as db:  # the scan and the insert in one write transaction: two look-alikes can't race
        if any(id_skeleton(other) == skeleton for (other,) in db.execute("SELECT id FROM agents")):
            return False
        db.execute("INSERT INTO agents (id, key_hash, created_at) VALUES (?, ?, ?)", (agent_id, key_hash, utc_now()))
    return True


def revoke_key(store: Store, agent_id: str) -> bool:
    """False when there is no such agent. The id stays taken; 'revoked:' is never a SHA-256 hex digest."""
    with store.transaction() as db:
        return db.execute("UPDATE agents SET key_hash = 'revoked:' || id WHERE id = ?", (agent_id,)).rowcount == 1


def insert_channel(store: Store, name: str, description: str, agent_id: str) -> dict | None:
    """None when the channel exists."""
    channel = {"name": name, "description": description, "created_by": agent_id, "created_at": utc_now()}
    try:
        with store.transaction() as db:
            db.execute("INSERT INTO channels (name, description, created_by, created_at) "
                       "VALUES (:name, :description, :created_by, :created_at)", channel)
    except sqlite3.IntegrityError:
        return None
    return channel


def insert_post(store: Store, channel: str, agent_id: str, content: str) -> dict:
    now = utc_now()
    result = parse_result(content) if channel == RESULTS_CHANNEL else None
    with store.transaction() as db:  # the post and its results row land together
        post_id = db.execute("INSERT INTO posts (channel, agent_id, content, created_at) VALUES (?, ?, ?, ?)",
                             (channel, agent_id, content, now)).lastrowid
        if result:
            sha = own_commit(db, result["commit_prefix"], agent_id)
            db.execute("INSERT INTO results (post_id, agent_id, created_at, commit_prefix, platform, dataset, profile, "
                       "val_bpb, vram_gb, status, description, fields, commit_hash) VALUES (:post_id, :agent_id, "
                       ":created_at, :commit_prefix, :platform, :dataset, :profile, :val_bpb, :vram_gb, :status, "
                       ":description, :fields, :commit_hash)",
                       {"post_id": post_id, "agent_id": agent_id, "created_at": now, "commit_hash": sha, **result})
            if sha and result["status"] == "keep":
                refresh_depths(db, sha)
    return {"id": post_id, "channel": channel, "agent_id": agent_id, "content": content, "created_at": now}


# ---------------------------------------------------------------------------
# Verified results and depth: a result counts for a commit only when its poster pushed that commit


def own_commit(db: sqlite3.Connection, prefix: str, agent_id: str) -> str | None:
    """The first commit this agent pushed whose hash starts with prefix."""
    found = db.execute("SELECT hash FROM commits WHERE hash >= ? AND hash < ? AND agent_id = ? ORDER BY seq LIMIT 1",
                       (prefix, prefix + "g", agent_id)).fetchone()
    return found[0] if found else None


def claim_results(db: sqlite3.Connection, sha: str, agent_id: str) -> None:
    """A commit being indexed verifies the results its pusher posted for it before the push."""
    prefixes = [sha[:n] for n in range(7, 41)]
    db.execute(f"UPDATE results SET commit_hash = ? WHERE commit_hash IS NULL AND agent_id = ? AND commit_prefix IN "
               f"({', '.join('?' * len(prefixes))})", (sha, agent_id, *prefixes))


def improvement_depth(db: sqlite3.Connection, sha: str, parents: list[str], known: dict[str, int]) -> int:
    """Improvements above the root: a commit adds one only when its pusher posted a kept result for it, so a chain
    of bare commits is no deeper than its base."""
    if not parents:
        return 0
    above = max(known[p] if p in known else db.execute("SELECT depth FROM commits WHERE hash = ?", (p,)).fetchone()[0]
                for p in parents)
    kept = db.execute("SELECT 1 FROM results WHERE commit_hash = ? AND status = 'keep' LIMIT 1", (sha,)).fetchone()
    return above + (kept is not None)


def refresh_depths(db: sqlite3.Connection, sha: str) -> None:
    """A kept result posted after its push deepens its commit and everything built on it."""
    below = db.execute("WITH RECURSIVE below(hash) AS (SELECT ? UNION SELECT child FROM edges JOIN below "
                       "ON parent = below.hash) SELECT hash, parents FROM commits JOIN below USING (hash) ORDER BY seq",
                       (sha,)).fetchall()  # seq is push order, so parents come before their children
    known = {}
    for row in below:
        known[row["hash"]] = improvement_depth(db, row["hash"], row["parents"].split(), known)
        db.execute("UPDATE commits SET depth = ? WHERE hash = ?", (known[row["hash"]], row["hash"]))
