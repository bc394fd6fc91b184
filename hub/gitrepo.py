"""The bare repository: git is always called with an argument list, never through a shell, and a pushed bundle is
checked in a quarantine object directory before any of its objects become part of the repository."""

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_BUNDLE_HEADER = 1024 * 1024     # a bundle's text header (refs and prerequisites)
FULL_HASH_RE = re.compile(r"[0-9a-f]{40}")


class GitError(Exception):
    """git itself failed: a fault of the hub, not of the request."""


class BadBundle(Exception):
    """The pushed body is not a bundle the hub can take; the message says why."""


def git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> bytes:
    result = subprocess.run(["git", "--git-dir", str(repo), *args], input=input, capture_output=True,
                            env={**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", **(env or {})})
    if result.returncode != 0:
        raise GitError(result.stderr.decode(errors="replace").strip() or f"git {args[0]} failed")
    return result.stdout


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


@dataclass
class BundleHeader:
    prerequisites: list[str]
    heads: list[str]
    pack_offset: int


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
        if f.read(4) != b"PACK":
            raise BadBundle("bundle has no pack data after its header (truncated?)")
    if not heads:
        raise BadBundle("bundle has no refs")
    return BundleHeader(prerequisites, sorted(set(heads)), offset)


def bundle_line_hash(line: str) -> str:
    sha = line[:40]
    if not FULL_HASH_RE.fullmatch(sha) or line[40:41] not in ("", " "):
        raise BadBundle(f"bad line in bundle header: {line[:80]!r}")
    return sha


def quarantine_env(repo: Path, quarantine: Path) -> dict:
    """New objects are written to the quarantine and only moved into the repository once fully verified."""
    return {"GIT_OBJECT_DIRECTORY": str(quarantine), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(repo / "objects")}


def index_pack(repo: Path, bundle: Path, offset: int, env: dict) -> None:
    with open(bundle, "rb") as f:
        f.seek(offset)
        pack = f.read()
    try:  # --strict runs the fsck checks on every object and its links; --fix-thin resolves deltas on known commits
        git(repo, "index-pack", "--stdin", "--fix-thin", "--strict", input=pack, env=env)
    except GitError as e:
        raise BadBundle(f"bundle's objects are truncated or invalid: {e}") from None


def read_new_commits(repo: Path, heads: list[str], env: dict) -> list[dict]:
    """The bundle's commits that no indexed commit reaches, parents before children."""
    try:
        out = git(repo, "log", "--topo-order", "--reverse", "--format=%H%x00%P%x00%at%x00%B%x00%x1e",
                  *heads, "--not", "--all", env=env)
    except GitError as e:  # index-pack passed, so what is left to fail is a ref to a tree, a blob or nothing
        raise BadBundle(f"bundle refs must name commits the bundle holds: {e}") from None
    commits = []
    for record in out.decode(errors="replace").split("\x00\x1e"):
        if record.strip():
            sha, parents, author_time, message = record.lstrip("\n").split("\x00", 3)
            commits.append({"hash": sha, "parents": parents.split(), "message": message.strip(),
                            "author_time": datetime.fromtimestamp(int(author_time), timezone.utc)
                            .strftime("%Y-%m-%dT%H:%M:%SZ")})
    return commits


def publish_pack(quarantine: Path, repo: Path) -> None:
    """Move the verified pack in; the .idx goes last because git ignores a pack until its index exists."""
    files = sorted((quarantine / "pack").iterdir(), key=lambda p: p.suffix == ".idx")
    for f in files:
        os.replace(f, repo / "objects" / "pack" / f.name)


def remove_unpublished_packs(repo: Path) -> None:
    """A kill between the moves in publish_pack leaves a pack without its .idx: git never saw it, so drop it."""
    pack_dir = repo / "objects" / "pack"
    indexed = {p.stem for p in pack_dir.glob("*.idx")}
    for f in pack_dir.iterdir():
        if f.suffix != ".idx" and f.stem not in indexed:
            f.unlink()

