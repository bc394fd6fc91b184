"""The hub's state: the index, the repository, the limits, and the push that ties git and the index together."""

import errno
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from hub.gitrepo import (GIT_READ_JOBS, GIT_TIMEOUT_S, BadBundle, GitError, GitTimeout, TooLarge, check_file_sizes,
                         check_object_sizes, check_reachable, check_tree, create_refs, delete_refs, git, git_head,
                         hub_refs, index_pack, init_repo, missing_objects, pack_refs, publish_pack, quarantine_env,
                         read_bundle_header, read_new_commits, remove_stale_locks, remove_unpublished_packs,
                         tree_files)
from hub.results import HASH_PREFIX_RE
from hub.store import Store, claim_results, improvement_depth, utc_now

HOUR = 3600.0
MB, KB = 1024 * 1024, 1024
COMMIT_HEADERS = 4 * KB  # a commit's tree, parents, author and committer lines, besides its message
PUSH_WAIT_S = 30.0  # a push queued longer than this is turned away, so queued pushes cannot fill the worker pool


@dataclass
class Config:
    data: Path
    admin_key: str | None = None
    max_bundle_mb: float = 32
    max_pushes_per_hour: int = 120          # a 5-minute loop pushes at most 12 an hour
    max_posts_per_hour: int = 600           # ...and posts a few times per experiment
    max_registrations_per_hour: int = 20    # per client address, only when registration is open
    max_object_mb: float = 16               # one git object, expanded: train.py is tens of KB
    max_push_mb: float = 64                 # all of one push's objects, expanded
    max_commits_per_push: int = 100         # a night of 5-minute experiments
    max_message_kb: float = 4               # one commit message
    max_diff_kb: float = 1024               # what GET /api/git/diff returns before it is cut
    allowed_paths: tuple[str, ...] = ("train.py",)  # every other file must match the baseline's
    baseline: str | None = None             # that commit, pushed by an agent (--baseline); or else:
    baseline_files: dict | None = None      # path -> (mode, blob) of the operator's checkout (--baseline-from)
    max_new_agents_per_hour: int = 100      # from all addresses together, only when registration is open
    max_uploads_per_agent: int = 2          # pushes one agent may be sending at once
    read_timeout: float = 30.0              # seconds a client may leave a request's header or body stalled
    first_byte_timeout: float = 5.0         # seconds from opening (or the last response) to a request's first byte
    max_connections_per_address: int = 32   # open at once from one client address
    allowed_hosts: tuple[str, ...] = ()     # Host header names served besides loopback and --host
    max_loose_refs: int = 1000              # refs written since the last `git pack-refs`
    max_file_kb: float = 1024               # one allowed file (train.py), which is tens of KB when honest
    max_objects_per_push: int = 50_000      # in one bundle's pack, by its header, before git reads it
    max_git_reads_per_hour: int = 600       # diffs and fetches per agent
    max_git_reads_per_agent: int = 2        # ...at once
    max_agent_disk_mb: float = 1024         # the packs one agent's pushes may add to repo.git
    max_disk_mb: float = 50 * 1024          # ...and all agents' together


class HubError(Exception):
    """An error the client caused or can act on: the API answers {"error": message} with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message



def too_slow(e: GitError, what: str) -> Exception:
    """A git call the request made too long is the request's 422, naming the limit; any other failure is ours."""
    if not isinstance(e, GitTimeout):
        return e
    return HubError(422, f"{what} took git longer than {GIT_TIMEOUT_S} s, the hub's limit for one git call")


def report_lost(repo: Path, lost: set[str]) -> None:
    """Serve on: the rest of the hub is whole, and the operator learns what to restore."""
    shown = ", ".join(sorted(lost)[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
    print(f"hub: {len(lost)} indexed commits have no objects in {repo} (a pack file lost?): {shown}. They stay "
          "listed but cannot be fetched: restore repo.git/objects/pack from a backup and restart", flush=True)


def disk_full(e: BaseException) -> bool:
    """Out of space, as Python, git (see gitrepo.git) or SQLite says it: HTTP 507, the hub's fault."""
    return ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or (isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL))


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
        stale = remove_stale_locks(self.repo)
        if stale:
            print(f"hub: removed {len(stale)} lock files a killed git left in {self.repo}: {', '.join(stale[:10])}",
                  flush=True)
        remove_unpublished_packs(self.repo)
        indexed = {r["hash"] for r in self.store.rows("SELECT hash FROM commits")}
        lost = missing_objects(self.repo, sorted(indexed))
        if lost:
            report_lost(self.repo, lost)
        with_refs = hub_refs(self.repo)
        # refs of a push killed after its refs, before its index rows; and refs to lost objects, which break git log
        delete_refs(self.repo, sorted(with_refs - (indexed - lost)))
        create_refs(self.repo, sorted(indexed - lost - with_refs))  # refs lost some other way, e.g. a hand-edited repo
        pack_refs(self.repo)
        self.loose_refs = 0

    def check_rate(self, action: str, who: str, limit: int) -> None:
        if not self.limiter.allow((action, who), limit):
            raise HubError(429, f"rate limit: at most {limit} {action}s per hour; try again later")

    def indexed(self, hashes: list[str]) -> set[str]:
        """Those of the hashes that the index holds."""
        found = set()
        for i in range(0, len(hashes), 500):  # SQLite's limit on parameters is far above 500
            chunk = hashes[i:i + 500]
            found |= {r["hash"] for r in self.store.rows(
                f"SELECT hash FROM commits WHERE hash IN ({', '.join('?' * len(chunk))})", chunk)}
        return found

    def push(self, bundle: Path, agent_id: str) -> list[str]:
        if not self.push_lock.acquire(timeout=PUSH_WAIT_S):
            raise HubError(503, "the hub is busy with other pushes: try again in a minute")
        try:
            return self.ingest(bundle, agent_id)
        except TooLarge as e:
            raise HubError(413, str(e)) from None
        except BadBundle as e:
            raise HubError(400, str(e)) from None
        except GitError as e:
            raise too_slow(e, "checking this bundle") from None
        finally:
            self.push_lock.release()

    def ingest(self, bundle: Path, agent_id: str) -> list[str]:
        """Verify a bundle completely, then land its objects and index rows, the index last."""
        header = read_bundle_header(bundle)
        missing = sorted(set(header.prerequisites) - self.indexed(header.prerequisites))
        if missing:
            raise HubError(400, f"bundle needs commit {missing[0]}, which the hub does not have: push that first, "
                                "or bundle the full history (git bundle create FILE HEAD)")
        if len(self.indexed(header.heads)) == len(header.heads):
            return []
        limits = self.config
        if header.objects > limits.max_objects_per_push:
            raise TooLarge(f"bundle's pack holds {header.objects} objects; the hub takes up to "
                           f"{limits.max_objects_per_push} a push (--max-objects-per-push)")
        quarantine = Path(tempfile.mkdtemp(prefix="push-", dir=self.incoming))
        try:
            (quarantine / "pack").mkdir()
            env = quarantine_env(self.repo, quarantine)
            index_pack(self.repo, bundle, header.pack_offset, env)
            sizes = check_object_sizes(self.repo, quarantine, int(limits.max_object_mb * MB),
                                         int(limits.max_push_mb * MB), int(limits.max_message_kb * KB) + COMMIT_HEADERS)
            commits = read_new_commits(self.repo, header, env, self.indexed, limits.max_commits_per_push,
                                       int(limits.max_message_kb * KB))
            check_reachable(self.repo, header, set(sizes), env)
            self.check_trees(commits, sizes, env)
            pack_bytes = sum(f.stat().st_size for f in (quarantine / "pack").iterdir())
            self.check_quota(agent_id, pack_bytes)
            publish_pack(quarantine, self.repo)
        finally:
            shutil.rmtree(quarantine, ignore_errors=True)
        # refs before rows: a commit is fetchable the moment it is listed; after a kill between the two,
        # recover() deletes the refs and the next push of these commits indexes them
        hashes = [c["hash"] for c in commits]
        create_refs(self.repo, hashes)
        try:
            self.index_commits(commits, agent_id, pack_bytes)
        except BaseException:
            delete_refs(self.repo, hashes)  # else `--not --all` would hide these commits from the next push
            raise
        self.loose_refs += len(hashes)
        if self.loose_refs >= self.config.max_loose_refs:
            pack_refs(self.repo)
            self.loose_refs = 0
        return hashes[::-1]

    def index_commits(self, commits: list[dict], agent_id: str, pack_bytes: int) -> None:
        pushed_at = utc_now()
        depth = {}
        with self.store.transaction() as db:
            db.execute("INSERT INTO usage (agent_id, pack_bytes) VALUES (?, ?) ON CONFLICT (agent_id) "
                       "DO UPDATE SET pack_bytes = pack_bytes + excluded.pack_bytes", (agent_id, pack_bytes))
            for c in commits:
                claim_results(db, c["hash"], agent_id)
                depth[c["hash"]] = improvement_depth(db, c["hash"], c["parents"], depth)
                db.execute("INSERT INTO commits (hash, parents, message, author_time, agent_id, pushed_at, depth) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (c["hash"], " ".join(c["parents"]), c["message"],
                                                            c["author_time"], agent_id, pushed_at, depth[c["hash"]]))
                db.executemany("INSERT OR IGNORE INTO edges (parent, child) VALUES (?, ?)",
                               [(p, c["hash"]) for p in c["parents"]])
                db.executemany("UPDATE commits SET leaf = 0 WHERE hash = ?", [(p,) for p in c["parents"]])

    def check_trees(self, commits: list[dict], sizes: dict[str, int], env: dict) -> None:
        if not commits:
            return
        baseline, baseline_files = self.config.baseline, self.config.baseline_files
        if baseline is None:
            raise BadBundle("this hub has no baseline to check pushes against: its operator starts it with "
                            "--baseline or --baseline-from")
        if baseline_files is None:
            try:
                baseline_files = tree_files(self.repo, baseline, env)
            except GitError:
                raise BadBundle(f"the hub's baseline is commit {baseline} (--baseline), which it does not have yet: "
                                "push that commit first") from None
        allowed, changed = set(self.config.allowed_paths), {}
        for c in commits:
            files = tree_files(self.repo, c["hash"], env)
            check_tree(c["hash"], files, baseline, baseline_files, allowed)
            changed |= {files[p][1]: f"{p} of commit {c['hash']}" for p in allowed & files.keys()
                        if files[p] != baseline_files.get(p)}
        check_file_sizes(changed, sizes, int(self.config.max_file_kb * KB))

    def check_quota(self, agent_id: str, pack_bytes: int) -> None:
        used = self.disk_usage(agent_id)
        limits = self.config
        if used["mine"] + pack_bytes > limits.max_agent_disk_mb * MB:
            raise HubError(413, f"this push adds {pack_bytes >> 10} KB; your pushes hold {used['mine'] >> 20} MB "
                                f"of the {limits.max_agent_disk_mb:g} MB an agent may add (--max-agent-disk-mb)")
        if used["total"] + pack_bytes > limits.max_disk_mb * MB:
            raise HubError(507, f"the hub's pushes hold {used['total'] >> 20} MB of its {limits.max_disk_mb:g} MB "
                                "(--max-disk-mb): nothing was stored; tell the hub's operator")

    def disk_usage(self, agent_id: str = "") -> dict:
        """Bytes of pack that all pushes (total) and this agent's (mine) added to repo.git."""
        return self.store.row("SELECT coalesce(sum(pack_bytes), 0) AS total, "
                              "coalesce(sum(CASE WHEN agent_id = ? THEN pack_bytes END), 0) AS mine FROM usage",
                              (agent_id,))

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

    def fetch_bundle(self, sha: str) -> Path:
        """The commit and its history as a bundle file in a folder of incoming/, which the caller streams and then
        removes (a killed git leaves a lock file beside the bundle)."""
        folder = Path(tempfile.mkdtemp(prefix="fetch-", dir=self.incoming))
        try:
            git(self.repo, "bundle", "create", "--quiet", str(folder / "commit.bundle"), f"refs/hub/{sha}",
                jobs=GIT_READ_JOBS)
        except GitError as e:
            shutil.rmtree(folder)
            raise too_slow(e, f"bundling commit {sha} with its history") from None
        return folder / "commit.bundle"

    def diff(self, a: str, b: str) -> str:
        limit = int(self.config.max_diff_kb * KB)
        try:
            out, cut = git_head(self.repo, "diff", "--no-color", "--no-ext-diff", a, b, limit=limit,
                                jobs=GIT_READ_JOBS)
        except GitError as e:
            raise too_slow(e, f"the diff of {a} and {b}") from None
        note = f"\n[diff cut at {limit // KB} KB (--max-diff-kb)]\n" if cut else ""
        return out.decode(errors="replace") + note

