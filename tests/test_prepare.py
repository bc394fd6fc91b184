"""prepare.py: datasets, tokenizer, packing and the fixed metric.

Checked against independent references: packing against a naive linear-scan best-fit, evaluate_bpb against a
float64 cross-entropy and hand-counted bytes, downloads against a real HTTP server on 127.0.0.1.
Run: uv run pytest tests/test_prepare.py
"""
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import prepare

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is was for on that with as by at from his her which but not are had this "
         "def return class import self None True lambda yield café naïve 東京 Ωμέγα 🙂").split()


def random_text(rng, n_words):
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.1:
            lines.append(" ".join(line))
            line = []
            if rng.random() < 0.3:
                lines.append("")  # blank lines: the natural chunk boundaries
    return "\n".join(lines + [" ".join(line)])


def finishes(fn, seconds):
    """Run fn on a daemon thread; its exception (or None) if it returns within `seconds`, else 'still running'."""
    outcome = []
    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else "still running"


def run_prepare(cache, *args, env=None, timeout=120):
    full_env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A small prepared --from dataset (random documents, some far longer than a chunk), built once."""
    cache = tmp_path_factory.mktemp("tiny") / "cache"
    rng = random.Random(0)
    docs = [(f"doc{i}", random_text(rng, rng.choice([20, 80, 400, 3000]))) for i in range(600)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "CACHE_DIR", cache)
        prepare.prepare_local("tiny", docs, {})
    return cache, docs


@pytest.fixture
def tiny(tiny_cache, monkeypatch):
    cache, docs = tiny_cache
    monkeypatch.setattr(prepare, "CACHE_DIR", cache)
    return prepare.Tokenizer.from_directory(), docs


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------

def naive_best_fit(docs, B, T, buffer_size):
    """The reference algorithm written plainly: linear scans over a list buffer in arrival order."""
    docs, buffer, out = iter(docs), [], []
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                for doc in docs:
                    buffer.append(doc)
                    if len(buffer) >= buffer_size:
                        break
                if not buffer:
                    return out
                room = T + 1 - len(row)
                fits = [i for i, d in enumerate(buffer) if len(d) <= room]
                if fits:
                    i = max(fits, key=lambda i: (len(buffer[i]), -i))
                    row.extend(buffer.pop(i))
                else:
                    i = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                    row.extend(buffer.pop(i)[:room])
            rows.append(row)
        out.append(np.array(rows))


@pytest.mark.parametrize("B,T,buffer_size", [(1, 16, 5), (3, 32, 20), (4, 64, 1000)])
def test_pack_rows_matches_naive_best_fit(B, T, buffer_size):
    rng = np.random.default_rng(T)
    docs = [np.concatenate([[0], rng.integers(1, 500, rng.integers(1, 3 * T))]) for _ in range(300)]
    got = [rows for rows, _ in prepare.pack_rows(((d, 1) for d in docs), B, T, buffer_size)]
    want = naive_best_fit(docs, B, T, buffer_size)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_pack_rows_invariants():
    rng = np.random.default_rng(0)
    B, T = 4, 48
    docs = [np.concatenate([[0], rng.integers(1, 500, rng.integers(1, 80))]) for _ in range(500)]
    whole = {tuple(d) for d in docs}
    heads = {tuple(d[:k]) for d in docs for k in range(1, len(d) + 1)}
    used = 0
    for rows, epoch in prepare.pack_rows(((d, 1) for d in docs), B, T, buffer_size=50):
        assert rows.shape == (B, T + 1) and rows.dtype == np.int64 and epoch == 1
        assert (rows[:, 0] == 0).all()  # every row starts with BOS, and is full: no padding value exists
        for row in rows:
            starts = np.flatnonzero(row == 0).tolist() + [T + 1]
            segments = [tuple(row[a:b]) for a, b in zip(starts[:-1], starts[1:])]
            assert all(s in whole for s in segments[:-1])  # only the row's last document may be cropped
            assert segments[-1] in heads
            used += len(segments)
    assert used >= 0.9 * len(docs) - 50  # all documents are consumed except the final buffer's leftovers


def test_loader_yields_packed_rows_shifted_contiguous_and_deterministic(tiny):
    tok, _ = tiny
    a = prepare.make_dataloader(tok, 4, 32, "train")
    b = prepare.make_dataloader(tok, 4, 32, "train")
    packed = prepare.pack_rows(prepare.iter_documents(prepare.token_files("train"), tok.get_bos_token_id()), 4, 32)
    for _ in range(20):
        xa, ya, ea = next(a)
        xb, yb, eb = next(b)
        rows, epoch = next(packed)
        assert xa.shape == ya.shape == (4, 32) and xa.dtype == torch.int64
        assert torch.equal(xa.view(-1), torch.from_numpy(rows[:, :-1]).reshape(-1))  # .view: the reference's contract
        assert torch.equal(ya.view(-1), torch.from_numpy(rows[:, 1:]).reshape(-1)) and ea == epoch
        assert (xa[:, 0] == tok.get_bos_token_id()).all()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ea == eb


def test_loader_cycles_epochs(tiny):
    tok, _ = tiny
    loader = prepare.make_dataloader(tok, 8, 64, "val")
    epochs = [next(loader)[2] for _ in range(200)]  # the epoch of the newest buffered document
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0]


def test_loader_thread_stops_when_the_loader_is_closed(tiny):
    tok, _ = tiny
    before = set(threading.enumerate())
    loader = prepare.make_dataloader(tok, 2, 16, "train")
    next(loader)
    (producer,) = set(threading.enumerate()) - before
    time.sleep(0.3)
    assert producer.is_alive()  # a few batches ahead, waiting for room in its queue
    loader.close()
    assert not producer.is_alive()


def test_loader_thread_is_stopped_before_the_interpreter_exits(tiny_cache):
    """A loader still open at exit: its thread must be gone before finalization, which would otherwise end it
    wherever it is (inside a torch op, pthread_exit can abort the process). atexit runs its functions last
    registered first, so the printing hook runs after the loader's own."""
    code = ("import atexit, sys, threading, prepare\n"
            "atexit.register(lambda: print('alive:', [t.name for t in threading.enumerate() if 'loader' in t.name]))\n"
            "loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 16, 'train')\n"
            "next(loader)\n"
            "sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "AUTORESEARCH_CACHE": str(tiny_cache[0])})
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "alive: []", result.stdout


def test_loader_failure_reaches_consumer(tiny, tmp_path, monkeypatch):
    tok, _ = tiny
    files = prepare.token_files("train")
    monkeypatch.setattr(prepare, "token_files", lambda split: [tmp_path / "missing.bin"] + files)
    with pytest.raises(FileNotFoundError):
        next(prepare.make_dataloader(tok, 2, 16, "train"))


def test_loader_on_empty_token_files_raises_instead_of_spinning(tiny, tmp_path, monkeypatch):
    tok, _ = tiny
    (tmp_path / "empty.bin").touch()
    monkeypatch.setattr(prepare, "token_files", lambda split: [tmp_path / "empty.bin"] * 2)
    error = finishes(lambda: next(prepare.make_dataloader(tok, 2, 16, "train")), seconds=10)
    assert isinstance(error, RuntimeError) and "the train split has no documents" in str(error)


def test_loader_copies_blocking_off_cuda(tiny, monkeypatch):
    """Non-blocking copies are for pinned memory on CUDA; elsewhere (CPU, MPS) the copy must be synchronous."""
    tok, _ = tiny
    calls, to = [], torch.Tensor.to
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    next(prepare.make_dataloader(tok, 2, 16, "train", device="cpu"))
    assert calls == [False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu(tiny):
    tok, _ = tiny
    cpu = prepare.make_dataloader(tok, 4, 32, "train")
    cuda = prepare.make_dataloader(tok, 4, 32, "train", device="cuda")
    for _ in range(5):
        (xc, yc, ec), (xg, yg, eg) = next(cpu), next(cuda)
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc) and eg == ec


# ---------------------------------------------------------------------------
# Chunking and local corpora
# ---------------------------------------------------------------------------

def test_chunk_text_is_lossless_and_bounded():
    rng = random.Random(0)
    for _ in range(50):
        text = random_text(rng, rng.randint(1, 4000))
        if rng.random() < 0.2:
            text += "x" * rng.randint(1, 3000)  # one line longer than any chunk
        limit = rng.choice([50, 200, 600])
        chunks = prepare.chunk_text(text, limit)
        assert "".join(chunks) == text
        assert all(0 < len(c) <= limit for c in chunks)


def test_chunk_text_prefers_blank_lines():
    para = ("word " * 30).strip()
    text = "\n\n".join([para] * 10)
    chunks = prepare.chunk_text(text, 2 * len(para) + 10)
    assert all(c.endswith("\n\n") for c in chunks[:-1])


def test_long_documents_are_chunked_not_discarded(tiny):
    tok, docs = tiny
    meta = prepare.read_meta("tiny")
    texts = []
    for name in meta["train"] + [meta["val"]]:
        texts += pq.read_table(prepare.CACHE_DIR / "tiny" / "shards" / name).column("text").to_pylist()
    assert max(len(t) for t in texts) <= prepare.CHUNK_CHARS
    assert sorted("".join(texts)) == sorted("".join(t for _, t in docs))  # every character is kept
    long_doc = max((t for _, t in docs), key=len)
    assert long_doc in "".join(texts)  # in order, contiguous across chunks


def held_out(key):
    """The documented split, written independently: sha1 of the key's UTF-8, first 8 bytes big-endian, below 5%."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) < 0.05 * 2**64


# By hand: `printf copy.py | sha1sum` starts 0864ab9774e1fdf9, below 0ccccccccccccccc (5% of 2^64), so copy.py is
# held out; os.py f7cf9ebd..., json/decoder.py bc8c91ce... are not. The same on every process and machine.
PINNED_SIDES = {"copy.py": True, "dis.py": True, "tempfile.py": True, "traceback.py": True,
                "os.py": False, "json/decoder.py": False, "random.py": False}


def test_split_sides_are_pinned_and_near_val_share():
    assert {key: prepare.is_val_doc(key) for key in PINNED_SIDES} == PINNED_SIDES
    keys = [f"file{i}.py" for i in range(20000)]
    sides = [prepare.is_val_doc(k) for k in keys]
    assert sides == [held_out(k) for k in keys]
    assert abs(sum(sides) / len(keys) - prepare.VAL_SHARE) < 0.01


def split_of(tmp_path, name, files):
    """(held-out texts, training texts) that --from's split makes of these files."""
    train, val, _ = prepare.write_text_shards(tmp_path / name, prepare.corpus_documents(files))
    read = lambda shard: pq.read_table(tmp_path / name / "shards" / shard).column("text").to_pylist()
    return Counter(read(val)), Counter(t for shard in train for t in read(shard))


def test_from_split_keys_on_content_alone(tmp_path):
    """Rows reordered or moved to another file format hold out the same documents, those the sha1 rule picks, with
    every copy of a duplicate on one side."""
    rng = random.Random(3)
    unique = list(dict.fromkeys(random_text(rng, 40) for _ in range(300)))
    assert max(map(len, unique)) < prepare.CHUNK_CHARS  # whole documents, no chunks, in the shards
    twice = [next(t for t in unique if held_out(t)), next(t for t in unique if not held_out(t))]
    docs = unique + twice * 2
    with open(tmp_path / "in_order.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    shuffled = docs[::-1]
    random.Random(4).shuffle(shuffled)
    pq.write_table(pa.table({"text": shuffled}), tmp_path / "shuffled.parquet")
    want_val = Counter(t for t in docs if held_out(t))
    assert len(want_val) >= 5 and want_val[twice[0]] == 3
    for name in ("in_order.jsonl", "shuffled.parquet"):
        val, train = split_of(tmp_path, name.split(".")[0], [tmp_path / name])
        assert val == want_val and val + train == Counter(docs)


def write_corpus(folder):
    """A .parquet, a .jsonl and .txt files under folder; returns their documents in --from's file order."""
    folder.mkdir(parents=True)
    rng = random.Random(1)
    docs = [random_text(rng, 200) for _ in range(80)] + [random_text(rng, 500) for _ in range(5)]
    pq.write_table(pa.table({"text": docs[:40], "id": list(range(40))}), folder / "a.parquet")
    with open(folder / "b.jsonl", "w") as f:
        for text in docs[40:80]:
            f.write(json.dumps({"text": text, "meta": 1}) + "\n")
    (folder / "sub").mkdir()
    for i, text in enumerate(docs[80:]):
        (folder / "sub" / f"c{i}.txt").write_text(text, encoding="utf-8")
    return docs


def test_from_corpus_end_to_end(tmp_path):
    docs = write_corpus(tmp_path / "mycorpus")
    r = run_prepare(tmp_path / "cache", "--from", str(tmp_path / "mycorpus"), env={"PYTHONHASHSEED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^dataset:     from-mycorpus-[0-9a-f]{8}$", r.stdout, re.MULTILINE)
    assert (tmp_path / "cache" / "active").read_text().strip() == "from-mycorpus"
    meta = json.loads((tmp_path / "cache" / "from-mycorpus" / "meta.json").read_text())
    assert meta["documents"] == 85 and meta["val_documents"] == sum(map(held_out, docs)) >= 2
    val = pq.read_table(tmp_path / "cache" / "from-mycorpus" / "shards" / "val.parquet").column("text").to_pylist()
    assert "".join(val) == "".join(filter(held_out, docs))  # another process, another hash seed: the same split
    again = run_prepare(tmp_path / "cache", "--from", str(tmp_path / "mycorpus"))
    assert "already prepared" in again.stdout


@pytest.mark.parametrize("name,content,expect", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "nofield.jsonl:2: expected an object with a string field 'text'"),
    ("latin1.txt", "caf\u00e9 ok".encode("latin-1"), "latin1.txt: not valid UTF-8 at byte 3"),
    ("notparquet.parquet", b"PAR1 this is not parquet", "notparquet.parquet: not a readable parquet file"),
])
def test_malformed_inputs_name_the_file(tmp_path, name, content, expect):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=expect.replace("(", r"\(")):
        prepare.read_corpus_file(tmp_path / name)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(SystemExit, match=r"x.parquet: no column 'text' \(columns: body\)"):
        prepare.read_corpus_file(tmp_path / "x.parquet")


def test_empty_folder_and_empty_corpus(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    r = run_prepare(tmp_path / "cache", "--from", str(tmp_path / "empty"))
    assert r.returncode != 0 and "no .parquet, .jsonl or .txt files found" in r.stderr
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    r = run_prepare(tmp_path / "cache", "--from", str(tmp_path / "blank"))
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert f"{(tmp_path / 'blank').resolve()} has 0 non-empty document(s)" in r.stderr
    assert "point --from at more .parquet, .jsonl or .txt text" in r.stderr
    assert not (tmp_path / "cache" / "active").exists()
    assert not list((tmp_path / "cache").glob(".*"))  # no build leftovers


def test_stale_build_folders_of_dead_runs_are_removed(cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = cache / f".tiny.building-{dead.pid}"
    running = cache / f".other.building-{os.getpid()}"
    for folder in (killed, running):
        (folder / "shards").mkdir(parents=True)
    rng = random.Random(2)
    prepare.prepare_local("tiny", [(f"d{i}", random_text(rng, 100)) for i in range(10)], {})
    assert not killed.exists() and running.exists()


def test_failed_rebuild_keeps_previous_dataset(tmp_path):
    write_corpus(tmp_path / "mycorpus")
    assert run_prepare(tmp_path / "cache", "--from", str(tmp_path / "mycorpus")).returncode == 0
    (tmp_path / "mycorpus" / "zz.jsonl").write_text("not json\n")
    r = run_prepare(tmp_path / "cache", "--from", str(tmp_path / "mycorpus"))
    assert r.returncode != 0 and "zz.jsonl:1: invalid JSON" in r.stderr
    assert r.stderr.strip().count("\n") == 0  # one clear line, no traceback
    assert (tmp_path / "cache" / "from-mycorpus" / "meta.json").exists()


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def test_tokenizer_round_trip_and_token_bytes(tiny):
    tok, _ = tiny
    text = "naïve café 東京 Ωμέγα 🙂 — déjà vu\n\tdef f(x): return x ** 2  # ∑"
    assert tok.decode(tok.encode(text)) == text
    batch = tok.encode([text, "hello"], prepend=tok.get_bos_token_id())
    assert batch[0][0] == tok.get_bos_token_id() and tok.decode(batch[0][1:]) == text
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == torch.int32 and len(token_bytes) == tok.get_vocab_size()
    for s in prepare.SPECIAL_TOKENS:
        assert token_bytes[tok.enc.encode_single_token(s)] == 0
    ids = tok.encode(text)
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_tokenizer_is_reused_not_retrained(tiny, capsys):
    meta = prepare.read_meta("tiny")
    root = prepare.CACHE_DIR / "tiny"
    before = (root / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns
    prepare.train_tokenizer([root / "shards" / s for s in meta["train"]], root / "tokenizer")
    assert "reusing" in capsys.readouterr().out
    assert (root / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns == before


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="too small"):
        prepare.train_tokenizer([], tmp_path, vocab_size=100)


def test_missing_data_names_prepare(cache):
    with pytest.raises(SystemExit, match="run `uv run prepare.py`"):
        prepare.Tokenizer.from_directory()
    with pytest.raises(SystemExit, match="run `uv run prepare.py`"):
        prepare.get_token_bytes()


# ---------------------------------------------------------------------------
# evaluate_bpb: the metric
# ---------------------------------------------------------------------------

class UniformModel(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        return torch.full(y.shape, math.log(self.vocab), dtype=torch.float64).reshape(-1)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 16, generator=g))
        self.out = torch.nn.Parameter(torch.randn(16, vocab, generator=g) * 0.3)

    def logits(self, x):
        h = self.emb[x].cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]  # depends on the whole prefix
        return h @ self.out

    def forward(self, x, y, reduction="mean"):
        return F.cross_entropy(self.logits(x).flatten(0, 1), y.reshape(-1), reduction=reduction)


def test_bpb_of_uniform_model_is_log2_vocab_times_tokens_per_byte(tiny):
    tok, _ = tiny
    V = tok.get_vocab_size()
    rows = prepare.eval_rows(tok)
    counted, nbytes = 0, 0
    for t in rows[:, 1:].reshape(-1).tolist():  # hand count from the tokenizer, not from token_bytes
        n = 0 if t >= V - len(prepare.SPECIAL_TOKENS) else len(tok.enc.decode_single_token_bytes(t))
        counted += n > 0
        nbytes += n
    want = math.log2(V) * counted / nbytes
    assert prepare.evaluate_bpb(UniformModel(V), tok, batch_size=7) == pytest.approx(want, rel=1e-9)


def test_bpb_matches_float64_reference_for_any_batch_size(tiny):
    tok, _ = tiny
    model = TinyLM(tok.get_vocab_size())
    rows = torch.from_numpy(prepare.eval_rows(tok))
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(x).double(), -1)
    nll = -logp.gather(-1, y[..., None])[..., 0]
    tb = prepare.get_token_bytes().long()[y]
    want = (nll * (tb > 0)).sum().item() / (math.log(2) * tb.sum().item())
    results = [prepare.evaluate_bpb(model, tok, batch_size=b) for b in (1, 5, 64, 10_000)]
    for r in results:
        assert r == pytest.approx(want, rel=1e-6)
    assert max(results) - min(results) < 1e-6 * want
    assert prepare.evaluate_bpb(model, tok, 5) == results[1]  # deterministic


def test_eval_rows_are_fixed_and_bos_aligned(tiny, monkeypatch):
    tok, _ = tiny
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * prepare.MAX_SEQ_LEN)
    rows = prepare.eval_rows(tok)
    assert rows.shape == (20, prepare.MAX_SEQ_LEN + 1)
    assert (rows[:, 0] == tok.get_bos_token_id()).all()
    np.testing.assert_array_equal(rows, prepare.eval_rows(tok))


# A hand-built dataset: tokens a, bc, é, def (1, 2, 2 and 3 UTF-8 bytes) and BOS = 4 (0 bytes), three documents
# that best-fit packing puts into two rows of context 4: the 5-token document, then the 3- and 2-token ones.
GOLDEN_DOCS = [[4, 0], [4, 1, 2], [4, 2, 2, 0, 3]]
GOLDEN_ROWS = [[4, 2, 2, 0, 3], [4, 1, 2, 4, 0]]


@pytest.fixture
def golden(cache, monkeypatch):
    root = cache / "golden"
    (root / "tokens").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    tokens = np.array(sum(GOLDEN_DOCS, []), dtype=np.uint16)
    tokens.tofile(root / "tokens" / "val.bin")
    torch.save(torch.tensor([1, 2, 2, 3, 0], dtype=torch.int32), root / "tokenizer" / "token_bytes.pt")
    prepare.write_json(root / "meta.json", dict(name="golden", train=[], val="val.parquet", val_tokens=len(tokens),
                                                vocab_size=5))
    prepare.activate("golden")
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 4)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8)
    ranks = {b"a": 0, b"bc": 1, "é".encode(): 2, b"def": 3}
    return prepare.Tokenizer(tiktoken.Encoding("golden", pat_str=r"\S+", mergeable_ranks=ranks,
                                               special_tokens={prepare.BOS_TOKEN: 4}))


class UniformLogits(torch.nn.Module):
    """All-zero logits over 5 tokens: every target costs ln 5 nats."""
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y, reduction="mean"):
        return F.cross_entropy(torch.zeros(y.numel(), 5), y.reshape(-1), reduction=reduction)


def test_eval_rows_golden(golden):
    np.testing.assert_array_equal(prepare.eval_rows(golden), GOLDEN_ROWS)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_bpb_golden(golden, batch_size):
    """Targets é é a def | bc é BOS a: 7 scored tokens (BOS has no bytes) and 8 + 5 = 13 bytes, so 7 ln 5 nats over
    13 ln 2; rel 1e-6 is float32's cross-entropy of ln 5."""
    bpb = prepare.evaluate_bpb(UniformLogits(), golden, batch_size)
    assert bpb == pytest.approx(7 * math.log2(5) / 13, rel=1e-6)


# ---------------------------------------------------------------------------
# climbmix download, against a local HTTP server
# ---------------------------------------------------------------------------

def shard_bytes(seed, n_docs=60):
    rng = random.Random(seed)
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [random_text(rng, 150) for _ in range(n_docs)]}), buf)
    return buf.getvalue()


class ShardServer:
    """Serves climbmix-style shards. plan[name] is a list of behaviours used one per request:
    'ok', '500', 'truncate' or '404'; when a list runs out, requests get 'ok'."""

    def __init__(self, names):
        self.files = {n: shard_bytes(i) for i, n in enumerate(names)}
        self.plan, self.requests = {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                steps = server.plan.get(name) or ["ok"]
                step = steps.pop(0) if server.plan.get(name) else "ok"
                if step == "404" or name not in server.files:
                    self.send_error(404)
                    return
                if step == "500":
                    self.send_error(500)
                    return
                body = server.files[name]
                if step == "truncate":
                    body = body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    names = [prepare.shard_name(i) for i in (0, 1, 2, prepare.VAL_SHARD)]
    s = ShardServer(names)
    monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
    yield s
    s.close()


def shard_dir():
    return prepare.CACHE_DIR / "climbmix" / "shards"


def test_download_success(server, cache):
    prepare.download_climbmix(3, workers=2, backoff=0.01)
    for i in (0, 1, 2, prepare.VAL_SHARD):
        assert (shard_dir() / prepare.shard_name(i)).read_bytes() == server.files[prepare.shard_name(i)]


def test_download_retries_transient_500_and_refetches_truncated(server, cache):
    server.plan = {prepare.shard_name(0): ["500", "500"], prepare.shard_name(1): ["truncate"]}
    prepare.download_climbmix(2, workers=2, backoff=0.01)
    assert server.requests.count(prepare.shard_name(0)) == 3
    assert server.requests.count(prepare.shard_name(1)) == 2
    assert (shard_dir() / prepare.shard_name(1)).read_bytes() == server.files[prepare.shard_name(1)]


def test_download_missing_shard_is_one_line_naming_shard_and_fixes(server, tmp_path):
    server.files.pop(prepare.shard_name(1))
    r = run_prepare(tmp_path / "cache", "--num-shards", "3", env={"HF_ENDPOINT": server.endpoint})
    assert r.returncode != 0
    assert re.fullmatch(r"prepare\.py: shard_00001\.parquet not found at http://127\.0\.0\.1:\d+/\S+ \(HTTP 404\): "
                        r"ask for fewer shards with --num-shards, or set HF_ENDPOINT to a mirror that has it\n",
                        r.stderr)
    assert server.requests.count(prepare.shard_name(1)) == 1  # a 404 is not retried
    shards = tmp_path / "cache" / "climbmix" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [prepare.shard_name(i) for i in (0, 2, prepare.VAL_SHARD)]


def test_download_persistent_truncation_leaves_no_file(server, cache):
    server.plan = {prepare.shard_name(0): ["truncate"] * 5}
    with pytest.raises(SystemExit, match="shard_00000.parquet: failed after 5 attempts"):
        prepare.download_climbmix(1, workers=1, backoff=0.01)
    assert sorted(p.name for p in shard_dir().iterdir()) == [prepare.shard_name(prepare.VAL_SHARD)]


def test_ctrl_c_cancels_queued_downloads(cache, monkeypatch):
    s = ShardServer([prepare.shard_name(i) for i in list(range(8)) + [prepare.VAL_SHARD]])
    monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
    real = prepare.download_shard
    def first_download_gets_ctrl_c(url, path, **kwargs):
        if path.name == prepare.shard_name(0):
            time.sleep(0.5)  # by now the main thread waits on the first result
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a KeyboardInterrupt in the main thread
            time.sleep(0.5)
        return real(url, path, **kwargs)
    monkeypatch.setattr(prepare, "download_shard", first_download_gets_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):  # Python's Ctrl-C handler, even under `pytest &` (conftest.py)
            prepare.download_climbmix(8, workers=1, backoff=0.01)
    finally:
        s.close()
    assert s.requests == [prepare.shard_name(0)]  # the one in flight finishes; the 8 queued never start


def test_download_resumes_after_interruption(server, cache):
    shard_dir().mkdir(parents=True)
    (shard_dir() / prepare.shard_name(0)).write_bytes(server.files[prepare.shard_name(0)])  # finished before
    (shard_dir() / prepare.shard_name(1)).write_bytes(server.files[prepare.shard_name(1)][:100])  # corrupt
    (shard_dir() / f".{prepare.shard_name(2)}.tmp-1-2").write_bytes(b"partial")  # killed mid-write
    prepare.download_climbmix(3, workers=2, backoff=0.01)
    assert prepare.shard_name(0) not in server.requests
    assert sorted(server.requests) == sorted([prepare.shard_name(i) for i in (1, 2, prepare.VAL_SHARD)])
    assert (shard_dir() / prepare.shard_name(1)).read_bytes() == server.files[prepare.shard_name(1)]
    assert not list(shard_dir().glob(".*"))


def test_unreachable_host_fails_fast_naming_offline_options(tmp_path):
    t0 = time.time()
    r = run_prepare(tmp_path / "cache", "--num-shards", "1", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode != 0 and time.time() - t0 < 15
    assert "cannot reach 127.0.0.1:9" in r.stderr and "--dataset stdlib" in r.stderr and "--from" in r.stderr


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 where connect hangs: the listener's backlog is full, so the kernel drops new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    yield port
    for sock in fillers + [listener]:
        sock.close()


@pytest.mark.parametrize("hang", ["connect", "dns"])
def test_unanswered_host_fails_within_one_deadline(silent_port, monkeypatch, hang):
    """A name with three silent addresses, or a DNS lookup that never returns: both within the one deadline."""
    real = socket.getaddrinfo
    def lookup(host, port, *args, **kwargs):
        if hang == "dns":
            time.sleep(60)
        return real("127.0.0.1", silent_port, *args, **kwargs) * 3
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    t0 = time.time()
    with pytest.raises(SystemExit, match=rf"cannot reach mirror.invalid:{silent_port} \(no answer within 1 s\)"
                                         r"\. Offline\? .*--dataset stdlib.*--from PATH"):
        prepare.check_reachable(f"http://mirror.invalid:{silent_port}/x", timeout=1.0)
    assert time.time() - t0 < 1.5


def test_climbmix_cli_end_to_end(server, tmp_path):
    r = run_prepare(tmp_path / "cache", "--num-shards", "2", "--download-workers", "2",
                    env={"HF_ENDPOINT": server.endpoint})
    assert r.returncode == 0, r.stdout + r.stderr
    root = tmp_path / "cache" / "climbmix"
    tokenizer_sha = hashlib.sha256((root / "tokenizer" / "tokenizer.pkl").read_bytes()).hexdigest()
    assert f"dataset:     climbmix-2shards-{tokenizer_sha[:8]}\n" in r.stdout and "train:       2 shards" in r.stdout
    assert sorted(p.name for p in (root / "tokens").iterdir()) == ["shard_00000.bin", "shard_00001.bin",
                                                                   "shard_06542.bin"]
    again = run_prepare(tmp_path / "cache", "--num-shards", "2", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert again.returncode == 0 and "3/3 shards present and valid" in again.stdout  # no network needed


def test_climbmix_tokenizer_is_checked_against_its_shards(server, cache, monkeypatch):
    """A tokenizer is reused only where it would be trained again the same; the label names shards and tokenizer."""
    tokenizer = cache / "climbmix" / "tokenizer"
    def label():
        return f"climbmix-{len(prepare.read_meta('climbmix')['train'])}shards-" + \
            hashlib.sha256((tokenizer / "tokenizer.pkl").read_bytes()).hexdigest()[:8]

    prepare.prepare_climbmix(1, workers=2)
    one = prepare.dataset_label()
    assert one == label() and one.startswith("climbmix-1shards-")
    with pytest.raises(SystemExit, match=rf"the tokenizer in {re.escape(str(tokenizer))} does not fit this dataset "
                                         r"\(it was trained on 1 shards, not on these 2\): retrain it with `rm -r "):
        prepare.prepare_climbmix(2, workers=2)
    assert prepare.dataset_label() == one  # nothing was rebuilt
    (tokenizer / "trained_on.json").unlink()  # as left by a prepare.py older than the record
    with pytest.raises(SystemExit, match="no readable trained_on.json records what it was trained on"):
        prepare.prepare_climbmix(1, workers=2)

    shutil.rmtree(tokenizer)  # the fix the message names; the character cap now stops training in shard 0
    monkeypatch.setattr(prepare, "TOKENIZER_MAX_CHARS", 1000)
    prepare.prepare_climbmix(2, workers=2)
    two = prepare.dataset_label()
    assert two == label() and two.startswith("climbmix-2shards-") and two[-8:] != one[-8:]
    prepare.prepare_climbmix(3, workers=2)  # shard 0 still comes first: the same tokenizer fits
    assert prepare.dataset_label() == f"climbmix-3shards-{two[-8:]}" == label()


def test_stdlib_label_names_interpreter_and_content(cache, monkeypatch, capsys):
    """`prepare.py --dataset stdlib` through main(), on the stdlib's json/ files only so the test stays fast."""
    real = prepare.stdlib_documents
    edit = {}  # key -> text appended to that document
    def json_package():
        for key, text in real():
            if key.startswith("json/"):
                yield key, text + edit.get(key, "")
    monkeypatch.setattr(prepare, "stdlib_documents", json_package)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--dataset", "stdlib"])

    def prepare_and_label():
        prepare.main()
        label = prepare.dataset_label()
        assert f"dataset:     {label}\n" in capsys.readouterr().out
        return label

    first = prepare_and_label()
    meta = prepare.read_meta("stdlib")
    assert meta["python"] == platform.python_version() and meta["documents"] >= 4
    assert re.fullmatch(rf"stdlib-py{re.escape(platform.python_version())}-[0-9a-f]{{8}}", first)
    assert first.endswith(meta["fingerprint"][:8])
    assert prepare_and_label() == first  # same interpreter, same files: same label
    edit["json/decoder.py"] = "\n# one more line\n"
    second = prepare_and_label()
    assert second != first and second.startswith(f"stdlib-py{platform.python_version()}-")


def test_train_imports_without_rustbpe():
    """A machine without rustbpe (the lent GPU machine) runs train.py on a dataset prepared elsewhere: only
    tokenizer training needs it."""
    code = "import sys; sys.modules['rustbpe'] = None; import train, prepare; print(prepare.VOCAB_SIZE)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(prepare.__file__).parent, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "8192", result.stderr[-2000:]
