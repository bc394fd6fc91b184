"""The hub's state: the index, the repository, the limits, and the push that ties git and the index together."""

import shutil
import sqlite3
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from hub.gitrepo import (BadBundle, create_refs, delete_refs, git, hub_refs, index_pack, init_repo, publish_pack,
                         quarantine_env, read_bundle_header, read_new_commits, remove_unpublished_packs)
from hub.results import HASH_PREFIX_RE
from hub.store import Store, utc_now

HOUR = 3600.0


@dataclass
class Config:
    data: Path
    admin_key: str | None = None
    max_bundle_mb: float = 32
    max_pushes_per_hour: int = 120          # a 5-minute loop pushes at most 12 an hour
    max_posts_per_hour: int = 600           # ...and posts a few times per experiment
    max_registrations_per_hour: int = 20    # per client address, only when registration is open


class HubError(Exception):
    """An error the client caused or can act on: the API answers {"error": message} with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message



class RateLimiter:
    """Sliding one-hour windows kept in memory: a restart forgives everyone, which is fine for abuse limits."""

    def __init__(self):
        self.events = defaultdict(deque)
        self.lock = threading.Lock()

    def allow(self, key: tuple, limit: int) -> bool:
        now = time.monotonic()
        with self.lock:
            events = self.events[key]
            while events and events[0] <= now - HOUR:
                events.popleft()
            if len(events) >= limit:
                return False
            events.append(now)
            return True


class Hub:
    def __init__(self, config: Config):
        self.config = config
        config.data.mkdir(parents=True, exist_ok=True)
        self.repo = config.data / "repo.git"
        self.incoming = config.data / "incoming"
        self.store = Store(config.data / "hub.db")
        self.limiter = RateLimiter()
        self.push_lock = threading.Lock()  # one push at a time: each sees the index the previous one left
        init_repo(self.repo)
        self.recover()

    def recover(self) -> None:
        """Finish or undo what a killed process left behind, before serving anything."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir()
        remove_unpublished_packs(self.repo)
        indexed = {r["hash"] for r in self.store.rows("SELECT hash FROM commits")}
        with_refs = hub_refs(self.repo)
        delete_refs(self.repo, sorted(with_refs - indexed))  # a push killed after its refs, before its index rows
        create_refs(self.repo, sorted(indexed - with_refs))  # refs lost some other way, e.g. a hand-edited repo

    def check_rate(self, action: str, who: str, limit: int) -> None:
        if not self.limiter.allow((action, who), limit):
            raise HubError(429, f"rate limit: at most {limit} {action}s per hour; try again later")

    def has_commit(self, sha: str) -> bool:
        return self.store.row("SELECT 1 FROM commits WHERE hash = ?", (sha,)) is not None

    def push(self, bundle: Path, agent_id: str) -> list[str]:
        with self.push_lock:
            try:
                return self.ingest(bundle, agent_id)
            except BadBundle as e:
                raise HubError(400, str(e)) from None

    def ingest(self, bundle: Path, agent_id: str) -> list[str]:
        """Verify a bundle completely, then land its objects and index rows, the index last."""
        header = read_bundle_header(bundle)
        for sha in header.prerequisites:
            if not self.has_commit(sha):
                raise HubError(400, f"bundle needs commit {sha}, which the hub does not have: push that first, "
                                    "or bundle the full history (git bundle create FILE HEAD)")
        if all(self.has_commit(sha) for sha in header.heads):
            return []
        quarantine = Path(tempfile.mkdtemp(prefix="push-", dir=self.incoming))
        try:
            (quarantine / "pack").mkdir()
            env = quarantine_env(self.repo, quarantine)
            index_pack(self.repo, bundle, header.pack_offset, env)
            commits = [c for c in read_new_commits(self.repo, header.heads, env) if not self.has_commit(c["hash"])]
            publish_pack(quarantine, self.repo)
        finally:
            shutil.rmtree(quarantine, ignore_errors=True)
        # refs before rows: a commit is fetchable the moment it is listed; after a kill between the two,
        # recover() deletes the refs and the next push of these commits indexes them
        hashes = [c["hash"] for c in commits]
        create_refs(self.repo, hashes)
        try:
            self.index_commits(commits, agent_id)
        except BaseException:
            delete_refs(self.repo, hashes)  # else `--not --all` would hide these commits from the next push
            raise
        return hashes[::-1]

    def index_commits(self, commits: list[dict], agent_id: str) -> None:
        pushed_at = utc_now()
        depth = {}
        with self.store.transaction() as db:
            for c in commits:
                parent_depths = [depth[p] if p in depth else self.commit_depth(db, p) for p in c["parents"]]
                depth[c["hash"]] = 1 + max(parent_depths) if parent_depths else 0
                db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (c["hash"], " ".join(c["parents"]), c["message"],
                                                            c["author_time"], agent_id, pushed_at, depth[c["hash"]]))
                db.executemany("INSERT OR IGNORE INTO edges (parent, child) VALUES (?, ?)",
                               [(p, c["hash"]) for p in c["parents"]])

    @staticmethod
    def commit_depth(db: sqlite3.Connection, sha: str) -> int:
        return db.execute("SELECT depth FROM commits WHERE hash = ?", (sha,)).fetchone()[0]

    def resolve(self, text: str) -> str:
        """A full hash from a unique prefix of at least 7 hex characters."""
        prefix = text.lower()
        if not HASH_PREFIX_RE.fullmatch(prefix):
            raise HubError(400, f"not a commit hash: {text[:80]!r} (7 to 40 hex characters)")
        # every hex digit sorts below 'g', so this range is exactly the hashes that start with prefix
        found = self.store.rows("SELECT hash FROM commits WHERE hash >= ? AND hash < ? LIMIT 2", (prefix, prefix + "g"))
        if not found:
            raise HubError(404, f"unknown commit {prefix}")
        if len(found) > 1:
            raise HubError(400, f"commit prefix {prefix} is ambiguous: give more characters")
        return found[0]["hash"]

    def fetch_bundle(self, sha: str) -> bytes:
        return git(self.repo, "bundle", "create", "--quiet", "-", f"refs/hub/{sha}")

    def diff(self, a: str, b: str) -> str:
        return git(self.repo, "diff", "--no-color", "--no-ext-diff", a, b).decode(errors="replace")

