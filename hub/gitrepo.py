"""The bare repository: git is always called with an argument list, never through a shell, and a pushed bundle is
checked in a quarantine object directory before any of its objects become part of the repository."""

import ctypes
import errno
import os
import re
import resource
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_BUNDLE_HEADER = 1024 * 1024     # a bundle's text header (refs and prerequisites)
FULL_HASH_RE = re.compile(r"[0-9a-f]{40}")
GIT_TIMEOUT_S = 60                  # any one git call; a bundle that takes longer is refused
GIT_MEMORY = 1024 * 1024 * 1024     # address space of any one git process
GIT_JOBS = threading.BoundedSemaphore(4)  # git processes at once for pushes and start-up, so none can fork-bomb
GIT_READ_JOBS = threading.BoundedSemaphore(4)  # ...and for diffs and fetches, apart: they cannot hold up a push
MAX_TREE_LISTING = 1024 * 1024      # `ls-tree -r` of one commit: a few files, unless trees repeat to blow up
# packs are mmapped, which counts against GIT_MEMORY; one thread keeps index-pack's arenas small; bigger blobs stream
GIT_CONFIG = ("-c", "core.packedGitLimit=256m", "-c", "core.packedGitWindowSize=32m", "-c", "pack.threads=1",
              "-c", "core.bigFileThreshold=16m")
PRCTL = getattr(ctypes.CDLL(None), "prctl", None)  # Linux; elsewhere git children outlive a SIGKILL of the hub
PR_SET_PDEATHSIG = 1


class GitError(Exception):
    """git itself failed: a fault of the hub, not of the request."""


class GitTimeout(GitError):
    """A git call ran past GIT_TIMEOUT_S: the request asked too much of it (HTTP 422 or 413)."""


class BadBundle(Exception):
    """The pushed body is not a bundle the hub can take; the message says why."""


class TooLarge(BadBundle):
    """The bundle is well formed but over one of the hub's size limits (HTTP 413)."""


def limit_git() -> None:
    """Runs in the git child between fork and exec: a delta bomb fails there, not in the server, and a server
    killed with SIGKILL takes its git children with it (the kernel kills them when their parent dies)."""
    resource.setrlimit(resource.RLIMIT_AS, (GIT_MEMORY, GIT_MEMORY))
    if PRCTL:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def remove_stale_locks(repo: Path) -> list[str]:
    """Lock files that a killed git left (a power cut during pack-refs leaves packed-refs.lock): at start-up no
    git of ours runs, so each is stale, and git refuses to touch what it locks until it is gone."""
    stale = sorted(repo.rglob("*.lock"))
    for lock in stale:
        lock.unlink()
    return [str(lock.relative_to(repo)) for lock in stale]


def git_command(repo: Path, args: tuple) -> list[str]:
    return ["git", "--git-dir", str(repo), *GIT_CONFIG, *args]


def git_env(env: dict | None) -> dict:
    return {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", **(env or {})}


def git(repo: Path, *args: str, input: bytes | None = None, stdin=None, env: dict | None = None,
        jobs: threading.BoundedSemaphore | None = None) -> bytes:
    with jobs or GIT_JOBS:
        try:
            result = subprocess.run(git_command(repo, args), input=input, stdin=stdin, capture_output=True,
                                    env=git_env(env), timeout=GIT_TIMEOUT_S, preexec_fn=limit_git)
        except subprocess.TimeoutExpired:
            raise GitTimeout(f"git {args[0]} took longer than {GIT_TIMEOUT_S} s") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"git {args[0]} failed"
        if "No space left on device" in message:  # the hub's disk, never the request's fault (LC_ALL=C: English)
            raise OSError(errno.ENOSPC, message)
        raise GitError(message)
    return result.stdout


def git_head(repo: Path, *args: str, limit: int, env: dict | None = None,
             jobs: threading.BoundedSemaphore | None = None) -> tuple[bytes, bool]:
    """At most `limit` bytes of git's output, and whether there was more: git is stopped there, so a diff of
    huge blobs costs the server `limit` bytes, whatever the blobs expand to."""
    with jobs or GIT_JOBS, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(git_command(repo, args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errors, env=git_env(env), preexec_fn=limit_git)
        timer = threading.Timer(GIT_TIMEOUT_S, proc.kill)
        timer.start()
        try:
            out = proc.stdout.read(limit + 1)
        finally:
            proc.kill()  # a no-op once git has exited
            proc.stdout.close()
            returncode = proc.wait()
            timer.cancel()
        if len(out) <= limit and returncode == -9:
            raise GitTimeout(f"git {args[0]} took longer than {GIT_TIMEOUT_S} s")
        if len(out) <= limit and returncode != 0:
            errors.seek(0)
            raise GitError(errors.read(4096).decode(errors="replace").strip() or f"git {args[0]} failed")
    return out[:limit], len(out) > limit


def git_lines(repo: Path, *args: str, env: dict | None = None):
    """git's output line by line as it comes, so that a listing of millions of objects is never held whole."""
    with GIT_JOBS, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(git_command(repo, args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errors, env=git_env(env), preexec_fn=limit_git)
        timer = threading.Timer(GIT_TIMEOUT_S, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                yield line.decode(errors="replace").rstrip("\n")
            returncode = proc.wait()
        finally:
            proc.kill()  # a no-op once git has exited; stops it when the caller stops early
            proc.stdout.close()
            proc.wait()
            timer.cancel()
        if returncode == -9:  # the timer's kill
            raise GitTimeout(f"git {args[0]} took longer than {GIT_TIMEOUT_S} s")
        if returncode != 0:
            errors.seek(0)
            raise GitError(errors.read(4096).decode(errors="replace").strip() or f"git {args[0]} failed")


def init_repo(repo: Path) -> None:
    if not (repo / "HEAD").exists():
        subprocess.run(["git", "init", "--quiet", "--bare", str(repo)], check=True)
        git(repo, "config", "gc.auto", "0")  # nothing may repack or prune behind the index's back


def create_refs(repo: Path, hashes: list[str]) -> None:
    """One ref per indexed commit keeps every object reachable and makes `--not --all` mean 'already indexed'."""
    if hashes:
        git(repo, "update-ref", "--stdin", input="".join(f"update refs/hub/{h} {h}\n" for h in hashes).encode())


def delete_refs(repo: Path, hashes: list[str]) -> None:
    if hashes:
        git(repo, "update-ref", "--stdin", input="".join(f"delete refs/hub/{h}\n" for h in hashes).encode())


def hub_refs(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/hub/").decode().split())


def pack_refs(repo: Path) -> None:
    """Move loose refs into packed-refs: 20,000 loose ref files made every push's `--not --all` 8x slower."""
    git(repo, "pack-refs", "--all")


def missing_objects(repo: Path, hashes: list[str]) -> set[str]:
    """Those of the hashes git has no object for, e.g. after a pack file was lost."""
    if not hashes:
        return set()
    out = git(repo, "cat-file", "--batch-check=%(objectname)", input="".join(f"{h}\n" for h in hashes).encode())
    return {line.split()[0] for line in out.decode().splitlines() if line.endswith(" missing")}


@dataclass
class BundleHeader:
    prerequisites: list[str]
    heads: list[str]
    pack_offset: int
    objects: int  # what the pack's own header says it holds


def read_bundle_header(path: Path) -> BundleHeader:
    """Parse a v2/v3 bundle header ourselves, so a bad body is rejected before git sees it."""
    prerequisites, heads = [], []
    with open(path, "rb") as f:
        if f.readline(64) not in (b"# v2 git bundle\n", b"# v3 git bundle\n"):
            raise BadBundle("body is not a git bundle (make one with: git bundle create FILE HEAD)")
        while True:
            line = f.readline(MAX_BUNDLE_HEADER)
            if not line.endswith(b"\n") or f.tell() > MAX_BUNDLE_HEADER:
                raise BadBundle("bundle header is truncated")
            line = line[:-1].decode(errors="replace")
            if not line:
                break
            if line.startswith("@"):
                if line != "@object-format=sha1":
                    raise BadBundle(f"bundle capability {line!r} is not supported (sha1, full objects only)")
            elif line.startswith("-"):
                prerequisites.append(bundle_line_hash(line[1:]))
            else:
                heads.append(bundle_line_hash(line))
        offset = f.tell()
        pack = f.read(12)  # "PACK", the version, the object count, all big-endian
        if len(pack) < 12 or pack[:4] != b"PACK":
            raise BadBundle("bundle has no pack data after its header (truncated?)")
    if not heads:
        raise BadBundle("bundle has no refs")
    return BundleHeader(prerequisites, sorted(set(heads)), offset, int.from_bytes(pack[8:12], "big"))


def bundle_line_hash(line: str) -> str:
    sha = line[:40]
    if not FULL_HASH_RE.fullmatch(sha) or line[40:41] not in ("", " "):
        raise BadBundle(f"bad line in bundle header: {line[:80]!r}")
    return sha


def quarantine_env(repo: Path, quarantine: Path) -> dict:
    """New objects are written to the quarantine and only moved into the repository once fully verified."""
    return {"GIT_OBJECT_DIRECTORY": str(quarantine), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(repo / "objects")}


def index_pack(repo: Path, bundle: Path, offset: int, env: dict) -> None:
    with open(bundle, "rb", buffering=0) as f:
        f.seek(offset)  # git reads the pack from here: the server never holds it
        try:  # --strict runs the fsck checks on every object and its links; --fix-thin resolves deltas on known commits
            git(repo, "index-pack", "--stdin", "--fix-thin", "--strict", stdin=f, env=env)
        except GitError as e:
            why = str(e).lower()
            if "out of memory" in why or "cannot allocate" in why:  # RLIMIT_AS stopped a delta bomb
                raise TooLarge(f"bundle's objects expand past git's memory limit ({GIT_MEMORY >> 20} MB)") from None
            if isinstance(e, GitTimeout):
                raise TooLarge(f"bundle's objects took git longer than {GIT_TIMEOUT_S} s to unpack") from None
            raise BadBundle(f"bundle's objects are truncated or invalid: {e}") from None


def check_object_sizes(repo: Path, quarantine: Path, max_object: int, max_total: int,
                       max_commit: int) -> dict[str, int]:
    """What the bundle's objects expand to, read from the quarantine alone: a few hundred bytes of deltas can
    name a blob of gigabytes, and the bundle limit only counts what was sent. Commits are held to max_commit, so
    that reading their messages is a bounded read. Returns each object's size by its name."""
    total, sizes = 0, {}
    for line in git_lines(repo, "cat-file", "--batch-all-objects",
                          "--batch-check=%(objectsize) %(objecttype) %(objectname)",
                          env={"GIT_OBJECT_DIRECTORY": str(quarantine)}):  # no alternates: the new objects only
        size, kind, sha = line.split()
        total += int(size)
        sizes[sha] = int(size)
        if int(size) > max_object:
            raise TooLarge(f"{kind} {sha} expands to {int(size) >> 20} MB; the hub takes objects up to "
                           f"{max_object >> 20} MB (--max-object-mb)")
        if kind == "commit" and int(size) > max_commit:
            raise TooLarge(f"commit {sha} is {int(size) >> 10} KB: its message is over the hub's limit "
                           "(--max-message-kb); keep it to a subject line and put long notes in a post")
    if total > max_total:
        raise TooLarge(f"bundle's objects expand to {total >> 20} MB; the hub takes up to {max_total >> 20} MB "
                       "a push (--max-push-mb)")
    return sizes


def check_reachable(repo: Path, header: BundleHeader, objects: set[str], env: dict) -> None:
    """Every object the bundle adds must belong to the history of its refs: objects that no commit reaches would
    take the disk unseen, attributed to no one. (Objects the hub has already, such as the bases that
    --fix-thin copies in, add nothing.)"""
    # a bundle without prerequisites is whole, so --fix-thin copied nothing in
    new = missing_objects(repo, sorted(objects)) if header.prerequisites else set(objects)
    for line in git_lines(repo, "rev-list", "--objects", *header.heads, "--not", *header.prerequisites, env=env):
        new.discard(line[:40])
    if new:
        raise BadBundle(f"bundle holds {len(new)} objects that its commits do not reach (e.g. {min(new)}): "
                        "bundle only what you push (git bundle create FILE HEAD)")


def check_file_sizes(blobs: dict[str, str], sizes: dict[str, int], limit: int) -> None:
    """The files a push may change (train.py), each at most `limit` bytes: blobs maps object -> 'path of commit';
    sizes has every object the push adds (one it does not add passed this check when it was pushed)."""
    for sha, where in blobs.items():
        if sizes.get(sha, 0) > limit:
            raise TooLarge(f"{where} is {sizes[sha]} bytes; the hub takes files up to {limit >> 10} KB "
                           "(--max-file-kb): an honest train.py is tens of KB")


def read_new_commits(repo: Path, header: BundleHeader, env: dict, indexed, max_commits: int,
                     max_message: int) -> list[dict]:
    """The bundle's commits that the index lacks (`indexed` says which of a list it has), parents before children.
    The walk stops at the bundle's prerequisites, so it costs the bundle's history, not the hub's: with 50,000
    commits, `--not --all` read every ref and took 0.26 s a push. It lists hashes only; the messages are read for
    the new commits alone, which check_object_sizes bounded."""
    try:
        walked = list(git_lines(repo, "rev-list", "--topo-order", *header.heads, "--not", *header.prerequisites,
                                env=env))
    except GitTimeout:
        raise
    except GitError as e:  # index-pack passed, so what is left to fail is a ref to a tree, a blob or nothing
        raise BadBundle(f"bundle refs must name commits the bundle holds: {e}") from None
    known = indexed(walked)
    new = [sha for sha in walked if sha not in known]
    if len(new) > max_commits:
        raise TooLarge(f"bundle adds more than {max_commits} commits; push fewer at a time (--max-commits-per-push)")
    if not new:
        return []
    out = git(repo, "log", "--no-walk=unsorted", "--stdin", "--format=%H%x00%P%x00%at%x00%B%x00%x1e", env=env,
              input="".join(f"{sha}\n" for sha in new).encode())
    records = [r.lstrip("\n").split("\x00", 3) for r in out.decode(errors="replace").split("\x00\x1e") if r.strip()]
    commits = [{"hash": sha, "parents": parents.split(), "message": message.strip(),
                "author_time": author_stamp(sha, author_time)} for sha, parents, author_time, message in records]
    for c in commits:
        if len(c["message"].encode()) > max_message:
            raise TooLarge(f"commit {c['hash']}'s message is over {max_message // 1024} KB: keep it to a subject "
                           "line and put long notes in a post (--max-message-kb)")
    return commits[::-1]  # rev-list lists children first (--no-walk=unsorted keeps that); the index wants parents first


def tree_files(repo: Path, commit: str, env: dict) -> dict[str, tuple[str, str]]:
    """path -> (mode, object) for every entry of a commit's tree, subtrees expanded."""
    out, more = git_head(repo, "ls-tree", "-r", "-z", "--full-tree", commit, limit=MAX_TREE_LISTING, env=env)
    if more:
        raise TooLarge(f"commit {commit}'s tree lists over {MAX_TREE_LISTING >> 20} MB of paths")
    return parse_tree(out)


def checkout_files(checkout: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """The HEAD commit of a checkout of the project and the files of its tree, as tree_files gives them."""
    def run(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, check=True).stdout

    head = run("rev-parse", "--verify", "HEAD").decode().strip()
    return head, parse_tree(run("ls-tree", "-r", "-z", "--full-tree", head))


def parse_tree(out: bytes) -> dict[str, tuple[str, str]]:
    files = {}
    for entry in out.decode(errors="replace").split("\x00"):
        if entry:
            meta, path = entry.split("\t", 1)
            mode, _, sha = meta.split()
            files[path] = (mode, sha)
    return files


def check_tree(commit: str, files: dict, baseline: str, baseline_files: dict, allowed: set[str]) -> None:
    """Only plain files, and only the allowed paths may differ from the baseline: a symlink for train.py
    writes through to whatever it names, and a changed uv.lock installs whatever it names."""
    for path, (mode, _) in files.items():
        if mode not in ("100644", "100755"):
            kind = {"120000": "a symlink", "160000": "a submodule"}.get(mode, f"mode {mode}")
            raise BadBundle(f"commit {commit} has {kind} at {path!r}: the hub takes plain files only")
    fixed = {p: e for p, e in files.items() if p not in allowed}
    expected = {p: e for p, e in baseline_files.items() if p not in allowed}
    if fixed != expected:
        changed = sorted(set(fixed.items()) ^ set(expected.items()))[0][0]
        raise BadBundle(f"commit {commit} changes {changed!r}, which must match the hub's baseline {baseline}: "
                        f"only {', '.join(sorted(allowed))} may differ (--allowed-paths)")


def author_stamp(sha: str, seconds: str) -> str:
    try:
        return datetime.fromtimestamp(int(seconds), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # git takes dates past the year 9999; datetime does not
        raise BadBundle(f"commit {sha} has an author date out of range: commit it with a real date") from None


def publish_pack(quarantine: Path, repo: Path) -> None:
    """Move the verified pack in; the .idx goes last because git ignores a pack until its index exists."""
    files = sorted((quarantine / "pack").iterdir(), key=lambda p: p.suffix == ".idx")
    for f in files:
        os.replace(f, repo / "objects" / "pack" / f.name)
        fsync_dir(repo / "objects" / "pack")  # the rename itself survives a power cut, the .pack's before the .idx's


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_unpublished_packs(repo: Path) -> None:
    """A kill between the moves in publish_pack leaves a pack without its .idx: git never saw it, so drop it."""
    pack_dir = repo / "objects" / "pack"
    indexed = {p.stem for p in pack_dir.glob("*.idx")}
    for f in pack_dir.iterdir():
        if f.suffix != ".idx" and f.stem not in indexed:
            f.unlink()

