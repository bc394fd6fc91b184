"""prepare.py on damaged state: corrupt files under the cache and a full disk.

A missing, corrupt or truncated meta.json, tokenizer.pkl, token_bytes.pt or token file (odd length, wrong dtype,
wrong size) stops the real loader (active_dataset, Tokenizer.from_directory, make_dataloader, evaluate_bpb) with one
line that names the file and the commands that rebuild it; for climbmix, following those commands rebuilds it.
Each case damages a copy of one small dataset, built once by prepare_local, in a temporary cache.
A full disk is an OSError(ENOSPC) injected at the write call, during a download from a local HTTP server and during
tokenization: it is reported once as "no space left on device under <folder>", never retried, and leaves no
partial file.
Run: uv run pytest tests/test_prepare_state.py
"""
import errno
import io
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import prepare
from test_prepare import ShardServer, random_text

COMMANDS = {"climbmix": "uv run prepare.py", "stdlib": "uv run prepare.py --dataset stdlib",
            "from-notes": "uv run prepare.py --from /data/notes"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small prepared dataset: a training shard, a validation shard, its tokenizer and token files."""
    cache = tmp_path_factory.mktemp("built")
    rng = random.Random(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "CACHE_DIR", cache)
        prepare.prepare_local("stdlib", [(f"d{i}", random_text(rng, 150)) for i in range(60)], {})
    return cache / "stdlib"


@pytest.fixture
def dataset(built, tmp_path, monkeypatch):
    """make(name): a fresh copy of the built dataset under `name` in a temporary cache, made active."""
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    def make(name):
        root = shutil.copytree(built, tmp_path / "cache" / name)
        meta = json.loads((root / "meta.json").read_text())
        meta["name"] = name
        if name.startswith("from-"):
            meta["source"] = "/data/notes"  # prepare records a --from corpus's path
        (root / "meta.json").write_text(json.dumps(meta))
        prepare.activate(name)
        return root
    return make


class ZeroLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y, reduction="mean"):
        return torch.zeros(y.numel())


def first_batch(split):
    return next(prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 16, split))


def evaluate():
    return prepare.evaluate_bpb(ZeroLoss(), prepare.Tokenizer.from_directory(), 4)


def train_bin(root):
    return root / "tokens" / "shard_00000.bin"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 1])


def as_int32(path):
    np.fromfile(path, dtype=np.uint16).astype(np.int32).tofile(path)


# (damaged file, how it is damaged, the loader that must stop, what climbmix removes: the file itself by default)
CASES = {
    "meta truncated": ("meta.json", truncate, prepare.active_dataset, None),
    "meta without entries": ("meta.json", lambda p: p.write_text('{"name": "x"}'), prepare.active_dataset, None),
    "tokenizer truncated": ("tokenizer/tokenizer.pkl", truncate, prepare.Tokenizer.from_directory, "tokenizer"),
    "tokenizer not an encoding": ("tokenizer/tokenizer.pkl", lambda p: p.write_bytes(pickle.dumps({"a": 1})),
                                  prepare.Tokenizer.from_directory, "tokenizer"),
    "tokenizer missing": ("tokenizer/tokenizer.pkl", os.unlink, prepare.Tokenizer.from_directory, "tokenizer"),
    "token bytes truncated": ("tokenizer/token_bytes.pt", truncate, evaluate, "tokenizer"),
    "token bytes short": ("tokenizer/token_bytes.pt", lambda p: torch.save(torch.load(p)[:-1], p), evaluate,
                          "tokenizer"),
    "train tokens odd length": ("tokens/shard_00000.bin", lambda p: p.write_bytes(p.read_bytes() + b"\0"),
                                lambda: first_batch("train"), None),
    "train tokens int32": ("tokens/shard_00000.bin", as_int32, lambda: first_batch("train"), None),
    "train tokens missing": ("tokens/shard_00000.bin", os.unlink, lambda: first_batch("train"), None),
    "val tokens cut short": ("tokens/val.bin", lambda p: p.write_bytes(p.read_bytes()[:-2]), evaluate, None),
    "val tokens int32": ("tokens/val.bin", as_int32, evaluate, None),
}


def expected_end(root, name, path, climbmix_part):
    """The rebuild advice, written out by hand for each kind of dataset."""
    if name == "climbmix":
        part = root / climbmix_part if climbmix_part else path
    else:
        part = root
    remove = f"`rm -r {part}`, then " if part.exists() else ""
    return f": rebuild it with {remove}`{COMMANDS[name]}`"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["stdlib", "climbmix", "from-notes"])
def test_damaged_file_is_one_line_naming_it_and_the_rebuild(dataset, case, name):
    relpath, damage, load, climbmix_part = CASES[case]
    root = dataset(name)
    path = root / relpath
    damage(path)
    with pytest.raises(SystemExit) as e:
        load()
    message = str(e.value)
    assert "\n" not in message
    state = "is corrupt (" if path.exists() else "is missing"
    assert message.startswith(f"{path} {state}"), message
    if name == "from-notes" and relpath == "meta.json":  # the damaged meta.json no longer says where the corpus is
        assert message.endswith(f": rebuild it with `rm -r {root}`, then `uv run prepare.py --from PATH`"), message
    else:
        assert message.endswith(expected_end(root, name, path, climbmix_part)), message


def test_odd_token_file_of_an_older_dataset_without_counts(dataset):
    """Datasets prepared before train_tokens was recorded still get the even-length check."""
    root = dataset("stdlib")
    meta = json.loads((root / "meta.json").read_text())
    del meta["train_tokens"]
    (root / "meta.json").write_text(json.dumps(meta))
    first_batch("train")  # intact: loads, and its loader thread goes on reading the file
    odd = train_bin(root).with_suffix(".odd")
    odd.write_bytes(train_bin(root).read_bytes() + b"\0")
    os.replace(odd, train_bin(root))  # as prepare writes: truncating the mapped file would kill that thread (SIGBUS)
    with pytest.raises(SystemExit) as e:
        first_batch("train")
    assert str(e.value).startswith(f"{train_bin(root)} is corrupt (")


@pytest.mark.parametrize("case", ["meta truncated", "tokenizer truncated", "token bytes short", "train tokens int32",
                                  "val tokens cut short"])
def test_climbmix_advice_rebuilds_without_downloading(dataset, case):
    """Remove what the message says, run what prepare_climbmix runs after its download: the dataset loads again."""
    relpath, damage, load, _ = CASES[case]
    root = dataset("climbmix")
    meta = prepare.read_meta("climbmix")
    damage(root / relpath)
    with pytest.raises(SystemExit) as e:
        load()
    removed = str(e.value).split("`rm -r ")[1].split("`")[0]
    if os.path.isdir(removed):
        shutil.rmtree(removed)
    else:
        os.unlink(removed)
    prepare.finish_dataset(root, "climbmix", meta["train"], meta["val"], {})
    assert sorted(os.listdir(root / "shards")) == ["shard_00000.parquet", "val.parquet"]  # nothing re-downloaded
    first_batch("train")
    assert evaluate() == 0.0


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------

class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes free: a write past them writes what fits, then fails with ENOSPC."""
    room = 1000
    written = 0

    def write(self, data):
        data = memoryview(data).cast("B")
        n = super().write(data[:FullDisk.room - FullDisk.written])
        FullDisk.written += n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n


@pytest.fixture
def full_disk(monkeypatch):
    """Every file prepare writes through open() or Path.write_bytes lands on a full disk."""
    monkeypatch.setattr(FullDisk, "written", 0)
    monkeypatch.setattr(prepare, "open", lambda path, mode="r": FullDisk(path, mode), raising=False)
    def write_bytes(self, data):
        with FullDisk(self, "wb") as f:
            return f.write(data)
    monkeypatch.setattr(type(prepare.CACHE_DIR), "write_bytes", write_bytes)
    return FullDisk


def test_full_disk_during_download_is_not_retried(full_disk, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    server = ShardServer([prepare.shard_name(i) for i in (0, prepare.VAL_SHARD)])
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    try:
        with pytest.raises(SystemExit) as e:
            prepare.download_climbmix(1, workers=1, backoff=0.01)
    finally:
        server.close()
    shards = tmp_path / "cache" / "climbmix" / "shards"
    assert str(e.value) == f"no space left on device under {shards}: free some space, then run the same command again"
    assert full_disk.written == full_disk.room  # the shard was half-written when the disk filled
    assert server.requests.count(prepare.shard_name(0)) == 1
    assert list(shards.iterdir()) == []


def test_full_disk_during_tokenization_leaves_no_partial_file(built, full_disk, tmp_path):
    enc = pickle.loads((built / "tokenizer" / "tokenizer.pkl").read_bytes())
    with pytest.raises(SystemExit) as e:
        prepare.tokenize_shards([built / "shards" / "shard_00000.parquet"], tmp_path / "tokens", enc)
    assert str(e.value).startswith(f"no space left on device under {tmp_path / 'tokens'}: ")
    assert full_disk.written == full_disk.room  # the token file was half-written when the disk filled
    assert list((tmp_path / "tokens").iterdir()) == []


def test_full_disk_while_saving_the_tokenizer_leaves_no_partial_file(built, full_disk, tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.train_tokenizer([built / "shards" / "shard_00000.parquet"], tmp_path / "tokenizer")
    assert str(e.value).startswith(f"no space left on device under {tmp_path / 'tokenizer'}: ")
    assert list((tmp_path / "tokenizer").iterdir()) == []
