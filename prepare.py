"""
One-time data preparation and the fixed runtime utilities for autoresearch.
The agent never edits this file.

Usage:
    uv run prepare.py                        # climbmix: download shards, train the tokenizer
    uv run prepare.py --num-shards 2         # fewer training shards (-1 = all)
    uv run prepare.py --dataset stdlib       # built-in offline corpus: this Python's stdlib sources
    uv run prepare.py --from ~/my_corpus     # your own .parquet (column text), .jsonl (field text) or .txt files

Each dataset lives in its own folder under ~/.cache/autoresearch (AUTORESEARCH_CACHE overrides) with its own
tokenizer; the last one prepared is the active one that train.py and evaluate_bpb use.
"""

import argparse
import atexit
import bisect
import errno
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import platform
import queue
import re
import shutil
import socket
import sys
import sysconfig
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import tiktoken
import torch

# ---------------------------------------------------------------------------
# Fixed constants
# ---------------------------------------------------------------------------

# gpu matches the reference exactly so H100 numbers compare with its published val_bpb 0.9979; the CPU profiles
# (cpu also serves Apple MPS) keep evaluation to a few percent of the budget on a 2-core machine. cpu-bf16 has the
# same metric as cpu; it exists because a CPU with AMX trains in bf16 at 4-7x the fp32 speed, and train.py gives
# it other defaults, so its results must never mix with cpu's.
# CPU_FLOPS: a CPU's budget is work, TIME_BUDGET seconds at this many FLOP/s (as step_flops counts them), so a
# run's steps never depend on the machine's load or speed. cpu: what its default did on the 2-core AMD EPYC of
# bench/results/noise-AMD-EPYC-2-threads-*.json (~195 counted steps in 300 s); cpu-bf16: issue 18's AMX Xeon ran
# the reference's small config at ~200 steps in 300 s, so its default gets the same.
PROFILES = {
    "gpu": dict(MAX_SEQ_LEN=2048, EVAL_TOKENS=40 * 524288, CPU_FLOPS=None),
    "cpu": dict(MAX_SEQ_LEN=256, EVAL_TOKENS=256 * 1024, CPU_FLOPS=7.5e10),
    "cpu-bf16": dict(MAX_SEQ_LEN=256, EVAL_TOKENS=256 * 1024, CPU_FLOPS=3.6e11),
}

def cpuinfo_field(name):
    """The first value of `name` in Linux's /proc/cpuinfo ("model name", "flags"), or None (not found, not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name), None)
    except OSError:
        return None

def cpu_flags():
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    return set((cpuinfo_field("flags") or "").split())

def choose_profile():
    """The profile and why: forced by AUTORESEARCH_PROFILE, else gpu on CUDA, cpu-bf16 on a CPU with AMX (a
    stable property, unlike a timing), cpu everywhere else."""
    forced = os.environ.get("AUTORESEARCH_PROFILE")
    if forced:
        if forced not in PROFILES:
            raise SystemExit(f"AUTORESEARCH_PROFILE={forced!r} is not a profile: use one of {', '.join(PROFILES)}")
        return forced, "forced by AUTORESEARCH_PROFILE"
    if torch.cuda.is_available():
        return "gpu", "CUDA is available"
    if "amx_bf16" in cpu_flags():
        return "cpu-bf16", "no CUDA device; the CPU has AMX, so bf16 matmuls are fast"
    return "cpu", "no CUDA device, no AMX"

PROFILE, PROFILE_REASON = choose_profile()
MAX_SEQ_LEN = PROFILES[PROFILE]["MAX_SEQ_LEN"]  # context length
EVAL_TOKENS = PROFILES[PROFILE]["EVAL_TOKENS"]  # validation tokens scored by evaluate_bpb
CPU_FLOPS = PROFILES[PROFILE]["CPU_FLOPS"]      # FLOP/s a CPU's budget is counted at (None: gpu)
TIME_BUDGET = 300                                # training time budget in seconds
if os.environ.get("AUTORESEARCH_TIME_BUDGET"):
    try:
        TIME_BUDGET = float(os.environ["AUTORESEARCH_TIME_BUDGET"])
        assert TIME_BUDGET > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"AUTORESEARCH_TIME_BUDGET={os.environ['AUTORESEARCH_TIME_BUDGET']!r}: give positive seconds")
    print(f"WARNING: AUTORESEARCH_TIME_BUDGET={TIME_BUDGET:g}s: a smoke test; results are NOT comparable "
          "with 300-second runs", file=sys.stderr)

VOCAB_SIZE = 8192
# GPT-4 split pattern with \p{N}{1,2} instead of {1,3}, as in the reference and nanochat
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text the BPE trainer sees at most
TOKENIZER_DOC_CAP = 10_000           # characters per document the BPE trainer sees at most

VAL_SHARE = 0.05     # share of documents held out for validation by --dataset stdlib and --from
CHUNK_CHARS = 600    # stdlib/--from documents are split below this: packing then uses 95% of tokens at context 256, vs 81% at 800
SHARD_CHARS = 64_000_000  # characters of text per parquet shard that stdlib/--from write

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
CLIMBMIX_REPO = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542       # the last climbmix shard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard, as in the reference

def shard_name(index):
    return f"shard_{index:05d}.parquet"

def climbmix_base_url():
    # HF_ENDPOINT is Hugging Face's own mirror setting: labs with a local mirror point it there
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{CLIMBMIX_REPO}"

# ---------------------------------------------------------------------------
# Files on disk: nothing half-written is ever trusted
# ---------------------------------------------------------------------------

def write_atomic(path, write):
    """Call write(tmp_path), then rename into place: a crash or a full disk leaves no partial file under any name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # not transient: a retry cannot help, freeing space can
            raise SystemExit(f"no space left on device under {path.parent}: free some space, then run the "
                             "same command again")
        raise
    finally:
        tmp.unlink(missing_ok=True)

def write_json(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))

def dataset_dir(name):
    return CACHE_DIR / name

def damaged(root, path, why, climbmix_part=None):
    """SystemExit for a missing or corrupt (`why`) file of the prepared dataset in `root`, with the commands that
    rebuild it: climbmix removes only `climbmix_part` (default: the file; its shards take long to download); stdlib
    and --from datasets rebuild whole, since prepare keeps one whose input is unchanged."""
    if root.name == "climbmix":
        part, command = Path(climbmix_part or path), "uv run prepare.py"
    elif root.name == "stdlib":
        part, command = root, "uv run prepare.py --dataset stdlib"
    else:
        try:
            source = json.loads((root / "meta.json").read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            source = "PATH"
        part, command = root, f"uv run prepare.py --from {source}"
    remove = f"`rm -r {part}`, then " if part.exists() and root.parent == CACHE_DIR else ""
    problem = f"is corrupt ({why})" if path.exists() else "is missing"
    return SystemExit(f"{path} {problem}: rebuild it with {remove}`{command}`")

def read_meta(name):
    """A dataset's meta.json, written last by prepare: its presence means the dataset is complete."""
    path = dataset_dir(name) / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise damaged(path.parent, path, f"not JSON: {e}")
    if not isinstance(meta, dict) or not {"train", "val", "val_tokens", "vocab_size"} <= meta.keys():
        raise damaged(path.parent, path, "no train, val, val_tokens or vocab_size entry")
    return meta

def is_valid_shard(path):
    """A shard counts only if it opens as parquet and has a string column 'text'."""
    try:
        field = pq.read_schema(path).field("text")
    except (OSError, KeyError, pa.ArrowException):
        return False
    return pa.types.is_string(field.type) or pa.types.is_large_string(field.type)

# ---------------------------------------------------------------------------
# climbmix: download with retries, resume and integrity checks
# ---------------------------------------------------------------------------

class DownloadError(Exception):
    pass

def tcp_problem(url, timeout):
    """None when url's host accepts a TCP connection within `timeout` seconds, else why not."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome = []
    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except (OSError, TypeError) as e:  # TypeError: a URL without a host
            outcome.append(e)
    # one deadline for it all: the DNS lookup has no timeout, and create_connection's applies per address
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome and outcome[0] is None:
        return None
    return outcome[0] if outcome else f"no answer within {timeout:g} s"

def check_reachable(url, timeout=5.0):
    """Fail fast (seconds, not minutes of retries) when the host cannot be reached at all."""
    reason = tcp_problem(url, timeout)
    if reason is None:
        return
    parts = urlparse(url)
    raise SystemExit(
        f"prepare.py: cannot reach {parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)} "
        f"({reason}). Offline? Use the built-in corpus with "
        "`uv run prepare.py --dataset stdlib`, your own files with `uv run prepare.py --from PATH`, "
        "or a mirror via HF_ENDPOINT.")

def download_shard(url, path, attempts=5, backoff=1.0):
    """Fetch one shard to a temporary name, verify it, then rename. Retries transient failures."""
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=(5, 60)) as r:
                if r.status_code == 404:
                    raise DownloadError(f"{path.name} not found at {url} (HTTP 404): ask for fewer shards "
                                        "with --num-shards, or set HF_ENDPOINT to a mirror that has it")
                r.raise_for_status()
                def save(tmp):
                    with open(tmp, "wb") as f:
                        for block in r.iter_content(chunk_size=1 << 20):
                            f.write(block)
                    if not is_valid_shard(tmp):
                        raise ValueError("download is not a parquet file with a string column 'text' (truncated?)")
                write_atomic(path, save)
            return path.stat().st_size
        except DownloadError:
            raise
        except (requests.RequestException, OSError, ValueError) as e:
            if attempt == attempts:
                raise DownloadError(f"{path.name}: failed after {attempts} attempts ({e}): run the same "
                                    "command again to resume (valid shards are kept)")
            time.sleep(backoff * 2 ** (attempt - 1))

def download_climbmix(num_shards, workers=8, backoff=1.0):
    """Make sure training shards 0..num_shards-1 and the pinned validation shard are present and valid."""
    shard_dir = dataset_dir("climbmix") / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(".*.tmp-*"):  # left by a run that was killed mid-download
        stale.unlink()
    ids = list(range(min(num_shards, MAX_SHARD))) + [VAL_SHARD]
    missing = [i for i in ids if not is_valid_shard(shard_dir / shard_name(i))]
    print(f"Data: {len(ids) - len(missing)}/{len(ids)} shards present and valid in {shard_dir}")
    if not missing:
        return
    base = climbmix_base_url()
    check_reachable(base)
    done, nbytes, t0, errors = 0, 0, time.time(), []
    with ThreadPoolExecutor(max(1, min(workers, len(missing)))) as pool:
        try:
            futures = [pool.submit(download_shard, f"{base}/{shard_name(i)}", shard_dir / shard_name(i),
                                   backoff=backoff) for i in missing]
            for future in futures:
                try:
                    nbytes += future.result()
                    done += 1
                except DownloadError as e:
                    errors.append(str(e))
                rate = nbytes / 1e6 / max(time.time() - t0, 1e-9)
                print(f"\rData: downloaded {done}/{len(missing)} shards, {nbytes / 1e6:.0f} MB, {rate:.1f} MB/s",
                      end="", flush=True)
        finally:
            pool.shutdown(cancel_futures=True)  # on Ctrl-C, wait only for the shards already downloading
    print()
    if errors:
        more = f" (and {len(errors) - 1} more shards failed)" if len(errors) > 1 else ""
        raise SystemExit(f"prepare.py: {errors[0]}{more}")

# ---------------------------------------------------------------------------
# stdlib and --from: build shards from local text, with a deterministic split
# ---------------------------------------------------------------------------

def is_val_doc(key):
    """Hash-based split: a document's side depends only on its key (a stdlib file's path, a --from document's
    text), never on order, process or machine."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2**64 < VAL_SHARE

def chunk_text(text, limit=CHUNK_CHARS):
    """Split text into pieces of at most `limit` characters at blank lines, else at line ends, else anywhere.
    The pieces concatenate back to the text exactly."""
    if len(text) <= limit:
        return [text]
    for sep in ("\n\n", "\n"):
        parts = [p for p in re.split(f"(?<={sep})", text) if p]  # each part keeps its separator
        if len(parts) > 1:
            break
    else:
        return [text[i:i + limit] for i in range(0, len(text), limit)]
    chunks = []
    for part in parts:
        for piece in chunk_text(part, limit):
            if chunks and len(chunks[-1]) + len(piece) <= limit:
                chunks[-1] += piece
            else:
                chunks.append(piece)
    return chunks

def stdlib_documents():
    """(key, text) for every UTF-8 .py file of the running Python's standard library, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1  # a few test files are deliberately in other encodings
            continue
        if text.strip():
            yield path.relative_to(root).as_posix(), text
    if skipped:
        print(f"Data: skipped {skipped} stdlib files that are not UTF-8")

def corpus_files(source):
    source = Path(source).expanduser()
    if not source.exists():
        raise SystemExit(f"prepare.py: --from {source}: no such file or folder")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    usable = [p for p in files if p.suffix in (".parquet", ".jsonl", ".txt")]
    if not usable:
        raise SystemExit(f"prepare.py: --from {source}: no .parquet, .jsonl or .txt files found")
    return source, usable

def read_corpus_file(path):
    """Documents of one user file; any malformed input stops with its file name and row or line."""
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise SystemExit(f"prepare.py: {path}: not valid UTF-8 at byte {e.start}; convert it to UTF-8")
    if path.suffix == ".jsonl":
        docs = []
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise SystemExit(f"prepare.py: {path}:{lineno}: invalid JSON ({e})")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise SystemExit(f"prepare.py: {path}:{lineno}: expected an object with a string field 'text'")
                docs.append(record["text"])
        return docs
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise SystemExit(f"prepare.py: {path}: not a readable parquet file ({e})")
    if "text" not in table.column_names:
        raise SystemExit(f"prepare.py: {path}: no column 'text' (columns: {', '.join(table.column_names)})")
    docs = table.column("text").to_pylist()
    for row, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise SystemExit(f"prepare.py: {path}: row {row}: 'text' is {type(doc).__name__}, not a string")
    return docs

def corpus_documents(files):
    """(key, text) of every non-empty document; the key is the text itself, so the split ignores file names and
    row order, and identical documents always land on the same side."""
    for path in files:
        for text in read_corpus_file(path):
            if text.strip():
                yield text, text

def write_text_shards(out_dir, documents):
    """Split documents train/val, chunk them, and write parquet shards; returns (train names, val name, stats)."""
    train, val = [], []
    for key, text in documents:
        (val if is_val_doc(key) else train).append((key, text))
    if not val:  # small corpora: hold out the one document the hash ranks first, so val is never empty
        val.append(min(train, key=lambda d: hashlib.sha1(d[0].encode()).digest()))
        train.remove(val[0])
    if not train:
        train.append(val.pop())

    def save(name, docs):
        chunks = [c for _, text in docs for c in chunk_text(text)]
        write_atomic(out_dir / "shards" / name, lambda tmp: pq.write_table(
            pa.table({"text": chunks}), tmp, row_group_size=4096))

    names, shard, size = [], [], 0
    for doc in train:
        shard.append(doc)
        size += len(doc[1])
        if size >= SHARD_CHARS:
            names.append(shard_name(len(names)))
            save(names[-1], shard)
            shard, size = [], 0
    if shard:
        names.append(shard_name(len(names)))
        save(names[-1], shard)
    save("val.parquet", val)
    return names, "val.parquet", dict(documents=len(train) + len(val), val_documents=len(val))

def fingerprint(documents):
    h = hashlib.sha256()
    for key, text in documents:
        h.update(key.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()

# ---------------------------------------------------------------------------
# Tokenizer: rustbpe training, saved as a tiktoken encoding
# ---------------------------------------------------------------------------

def training_text(shard_paths, seen):
    """Training-split text for the BPE trainer, capped per document and in total. `seen` records the shards read
    and whether the total cap stopped the reading."""
    nchars = 0
    for path in shard_paths:
        seen["shards"].append(path.name)
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:TOKENIZER_DOC_CAP]
                nchars += len(doc)
                yield doc
                if nchars >= TOKENIZER_MAX_CHARS:
                    seen["capped"] = True
                    return

def check_tokenizer_fits(tokenizer_dir, shard_paths):
    """An existing tokenizer is reused only if training it now would read the same text: the shards it read are
    the first training shards, and all of them unless the character cap stopped it."""
    names = [p.name for p in shard_paths]
    try:
        seen = json.loads((tokenizer_dir / "trained_on.json").read_text())
        read = seen["shards"]
        if names[:len(read)] == read and (seen["capped"] or len(names) == len(read)):
            return
        why = f"it was trained on {len(read)} shards, not on these {len(names)}"
    except (OSError, ValueError, KeyError, TypeError):
        why = "no readable trained_on.json records what it was trained on"
    raise SystemExit(f"prepare.py: the tokenizer in {tokenizer_dir} does not fit this dataset ({why}): retrain it "
                     f"with `rm -r {tokenizer_dir}`, then `uv run prepare.py` with the same options again")

def train_tokenizer(shard_paths, tokenizer_dir, vocab_size=VOCAB_SIZE):
    """Train BPE on the training shards; save tokenizer.pkl and token_bytes.pt. An existing valid one is reused."""
    pkl, tb = tokenizer_dir / "tokenizer.pkl", tokenizer_dir / "token_bytes.pt"
    if pkl.exists() and tb.exists():
        check_tokenizer_fits(tokenizer_dir, shard_paths)
        print(f"Tokenizer: reusing {tokenizer_dir}")
        return
    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:  # rustbpe panics (an uncatchable BaseException) below 256
        raise SystemExit(f"prepare.py: vocab size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
    print(f"Tokenizer: training BPE (vocab {vocab_size}) on the training split...")
    import rustbpe  # here, not at the top: train.py imports this file on machines without rustbpe
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    seen = dict(shards=[], capped=False)
    bpe.train_from_iterator(training_text(shard_paths, seen), n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name="autoresearch", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)})
    sample = "Hello world! Numbers: 123. Unicode: héllo 你好 🙂\n\tdef f(x): return x**2"
    if enc.decode(enc.encode_ordinary(sample)) != sample:
        raise SystemExit("prepare.py: tokenizer round trip failed; this is a bug, please report it")
    special = {enc.encode_single_token(s) for s in SPECIAL_TOKENS}
    token_bytes = torch.tensor([0 if i in special else len(enc.decode_single_token_bytes(i))
                                for i in range(enc.n_vocab)], dtype=torch.int32)
    saved = io.BytesIO()
    torch.save(token_bytes, saved)  # to memory, then bytes to disk: torch.save to a path hides a full disk's ENOSPC
    write_atomic(tb, lambda tmp: tmp.write_bytes(saved.getvalue()))
    write_json(tokenizer_dir / "trained_on.json", seen)
    write_atomic(pkl, lambda tmp: tmp.write_bytes(pickle.dumps(enc)))  # written last: marks the pair complete
    print(f"Tokenizer: trained in {time.time() - t0:.1f}s")
    if enc.n_vocab < vocab_size:
        print(f"Tokenizer: the corpus supports only {enc.n_vocab} tokens (of {vocab_size}): it is small")

# ---------------------------------------------------------------------------
# Tokenize once at prepare time: the loader then only slices memory-mapped arrays
# ---------------------------------------------------------------------------

def tokenize_shards(shard_paths, token_dir, enc):
    """Write <shard>.bin: uint16 tokens of every document, each preceded by BOS. Present files are kept. Returns
    each file's token count."""
    bos = enc.encode_single_token(BOS_TOKEN)
    counts, t0 = [], time.time()
    for n, path in enumerate(shard_paths, 1):
        out = token_dir / (path.stem + ".bin")
        if not out.exists():
            pf = pq.ParquetFile(path)
            parts = []
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                for ids in enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1):
                    parts.append(np.array([bos] + ids, dtype=np.uint16))
            tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
            write_atomic(out, lambda tmp: tmp.write_bytes(tokens))  # tokens.tofile hides a full disk's ENOSPC
        counts.append(out.stat().st_size // 2)
        print(f"\rTokens: {n}/{len(shard_paths)} shards, {sum(counts) / 1e6:.1f}M tokens, "
              f"{time.time() - t0:.0f}s", end="", flush=True)
    print()
    return counts

def activate(name):
    write_atomic(CACHE_DIR / "active", lambda tmp: tmp.write_text(name + "\n"))

def finish_dataset(root, name, train, val, extra):
    """Tokenizer, token files, then meta.json: written last, it marks the dataset complete."""
    shards = [root / "shards" / s for s in train]
    if not (root / "tokenizer" / "tokenizer.pkl").exists():
        shutil.rmtree(root / "tokens", ignore_errors=True)  # tokens of an older tokenizer must not survive it
    train_tokenizer(shards, root / "tokenizer")
    enc = Tokenizer.from_directory(root / "tokenizer").enc
    train_tokens = tokenize_shards(shards, root / "tokens", enc)
    [val_tokens] = tokenize_shards([root / "shards" / val], root / "tokens", enc)
    meta = dict(name=name, train=train, val=val, val_tokens=val_tokens, train_tokens=train_tokens,
                vocab_size=enc.n_vocab, **extra)
    write_json(root / "meta.json", meta)
    return meta

def prepare_climbmix(num_shards, workers):
    download_climbmix(num_shards, workers)
    shard_dir = dataset_dir("climbmix") / "shards"
    val = shard_name(VAL_SHARD)
    train = sorted(p.name for p in shard_dir.glob("shard_*.parquet") if p.name != val and is_valid_shard(p))
    meta = finish_dataset(dataset_dir("climbmix"), "climbmix", train, val, dict(source=climbmix_base_url()))
    activate("climbmix")
    return meta

def remove_stale_builds():
    """Delete build folders left by prepare runs that were killed; a running prepare's folder is kept."""
    for folder in CACHE_DIR.glob(".*.building-*"):
        try:
            os.kill(int(folder.name.rsplit("-", 1)[1]), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not our naming, or another user's live process: leave it alone

def prepare_local(name, documents, extra):
    """Build a dataset from local documents into a temporary folder, then move it into place whole."""
    remove_stale_builds()
    docs = list(documents)
    if len(docs) < 2:  # the split needs a train and a val document
        raise SystemExit(f"prepare.py: {extra.get('source', name)} has {len(docs)} non-empty document(s), at "
                         "least 2 are needed: point --from at more .parquet, .jsonl or .txt text")
    fp = fingerprint(docs)
    meta = read_meta(name)
    if meta and meta.get("fingerprint") == fp:
        print(f"Data: {name} already prepared from identical input")
        activate(name)
        return meta
    building = dataset_dir(f".{name}.building-{os.getpid()}")
    try:
        print(f"Data: {len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f}M characters")
        train, val, stats = write_text_shards(building, docs)
        meta = finish_dataset(building, name, train, val, dict(fingerprint=fp, **stats, **extra))
        shutil.rmtree(dataset_dir(name), ignore_errors=True)
        os.replace(building, dataset_dir(name))
    finally:
        shutil.rmtree(building, ignore_errors=True)
    activate(name)
    return meta

# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py)
# ---------------------------------------------------------------------------

def active_dataset():
    """Name of the active, completely prepared dataset, or a clear exit naming the command to run."""
    pointer = CACHE_DIR / "active"
    name = pointer.read_text().strip() if pointer.exists() else None
    if not name or read_meta(name) is None:
        raise SystemExit(f"no prepared dataset in {CACHE_DIR}: run `uv run prepare.py` "
                         "(or `uv run prepare.py --dataset stdlib` offline)")
    return name

def dataset_label(name=None):
    """The dataset (the active one by default) as one word precise enough to tell results apart:
    climbmix-10shards-1a2b3c4d (training shards and the sha256 of tokenizer.pkl), stdlib-py3.11.7-1a2b3c4d
    (interpreter and content hash), from-NAME-1a2b3c4d (content hash)."""
    name = name or active_dataset()
    meta = read_meta(name)
    parts = [name]
    if name == "climbmix":  # no content hash: the shard count and the tokenizer trained on them tell runs apart
        tokenizer_dir = dataset_dir(name) / "tokenizer"
        Tokenizer.from_directory(tokenizer_dir)  # a missing or damaged one stops here with the command to rebuild it
        tokenizer_sha = hashlib.sha256((tokenizer_dir / "tokenizer.pkl").read_bytes()).hexdigest()
        parts += [f"{len(meta['train'])}shards", tokenizer_sha[:8]]
    if meta.get("python"):
        parts.append(f"py{meta['python']}")
    if meta.get("fingerprint"):
        parts.append(meta["fingerprint"][:8])
    return "-".join(parts)

class Tokenizer:
    """Thin wrapper around the tiktoken encoding that prepare.py trained."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else dataset_dir(active_dataset()) / "tokenizer"
        path = tokenizer_dir / "tokenizer.pkl"
        try:
            enc = pickle.loads(path.read_bytes())
        except Exception:  # a missing file, or damaged bytes: unpickling those can raise almost any exception
            enc = None
        if not isinstance(enc, tiktoken.Encoding) or BOS_TOKEN not in enc.special_tokens_set:
            raise damaged(tokenizer_dir.parent, path, "not a pickled tiktoken encoding with BOS", tokenizer_dir)
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Token ids of a string, or a list of lists for a list of strings; `prepend` puts a token id first."""
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        if isinstance(text, list):
            return [head + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

def get_token_bytes(device="cpu"):
    """UTF-8 byte length of every token id (0 for special tokens), for bits-per-byte."""
    name = active_dataset()
    path = dataset_dir(name) / "tokenizer" / "token_bytes.pt"
    try:
        token_bytes = torch.load(path, map_location=device)
    except Exception:  # a missing file, or damaged bytes: zip, pickle and torch each raise their own exceptions
        token_bytes = None
    vocab_size = read_meta(name)["vocab_size"]
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.dtype == torch.int32
            and token_bytes.shape == (vocab_size,)):
        raise damaged(dataset_dir(name), path, f"not {vocab_size} int32 byte lengths", path.parent)
    return token_bytes

def token_files(split):
    """The active dataset's token files for a split, in their fixed order, each checked against the token count
    prepare recorded: two bytes per uint16 token."""
    name = active_dataset()
    meta = read_meta(name)
    if split == "train":  # datasets prepared before train_tokens was recorded are checked for an even size only
        shards, counts = meta["train"], meta.get("train_tokens") or [None] * len(meta["train"])
    else:
        shards, counts = [meta["val"]], [meta["val_tokens"]]
    paths = [dataset_dir(name) / "tokens" / (Path(s).stem + ".bin") for s in shards]
    for path, count in zip(paths, counts):
        size = path.stat().st_size if path.exists() else None
        if size is None or size % 2 or (count is not None and size != 2 * count):
            expected = "an even number of" if count is None else 2 * count
            raise damaged(dataset_dir(name), path, f"{size} bytes, not {expected} bytes of uint16 tokens")
    return paths

def iter_documents(paths, bos, epochs=None):
    """(token array of one BOS-led document, epoch) in fixed order, cycling over epochs (forever by default)."""
    epoch = 1
    while epochs is None or epoch <= epochs:
        found = False
        for path in paths:
            tokens = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
            starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
            for a, b in zip(starts[:-1], starts[1:]):
                found = True
                yield tokens[a:b], epoch
        if not found:
            return  # every file is empty: stop, so the caller reports it instead of cycling forever
        epoch += 1

def pack_rows(documents, B, T, buffer_size=1000):
    """BOS-aligned best-fit packing into (B, T+1) int64 arrays with no padding: the largest buffered document
    that fits goes next; when none fits, the shortest is cropped to fill the row. Stops when documents run out."""
    cap = T + 1
    lengths, by_length = [], {}  # sorted lengths of buffered documents; length -> FIFO of documents
    docs = iter(documents)
    epoch, exhausted = 1, False
    while True:
        rows = np.empty((B, cap), dtype=np.int64)
        for r in range(B):
            pos = 0
            while pos < cap:
                while not exhausted and len(lengths) < buffer_size:
                    try:
                        doc, epoch = next(docs)
                    except StopIteration:
                        exhausted = True
                        break
                    bisect.insort(lengths, len(doc))
                    by_length.setdefault(len(doc), deque()).append(doc)
                if not lengths:
                    return
                room = cap - pos
                i = bisect.bisect_right(lengths, room) - 1
                n = lengths.pop(max(i, 0))
                doc = by_length[n].popleft()
                take = min(n, room)
                rows[r, pos:pos + take] = doc[:take]
                pos += take
        yield rows, epoch

def make_dataloader(tokenizer, B, T, split, device="cpu", buffer_size=1000):
    """Infinite (inputs, targets, epoch) batches of contiguous (B, T) tensors on `device`, targets shifted by one.
    Packing runs on a background thread a few batches ahead, so the accelerator never waits for it. The thread
    stops when the loader is closed and before the interpreter exits: a daemon thread caught inside a torch op at
    exit is ended by pthread_exit, which can abort the process (a run that had exited 1 was once seen to die of
    SIGABRT, "terminate called without an active exception")."""
    assert split in ("train", "val"), split
    device = torch.device(device)
    docs = iter_documents(token_files(split), tokenizer.get_bos_token_id())
    batches, stop = queue.Queue(maxsize=4), threading.Event()
    def put(item):  # waits for room, but gives up once stopped: nobody will read the queue again
        while not stop.is_set():
            try:
                return batches.put(item, timeout=0.1)
            except queue.Full:
                pass
    def produce():
        try:
            for rows, epoch in pack_rows(docs, B, T, buffer_size):
                if stop.is_set():
                    return
                rows = torch.from_numpy(rows)
                pair = torch.stack((rows[:, :-1], rows[:, 1:]))  # contiguous, as the reference's: .view(-1) works
                put((pair.pin_memory() if device.type == "cuda" else pair, epoch))
            put(RuntimeError(f"the {split} split has no documents: run `uv run prepare.py` again"))
        except BaseException as e:  # hand any failure to the consumer instead of leaving it waiting forever
            put(e)
    producer = threading.Thread(target=produce, name=f"{split} loader", daemon=True)
    def halt():
        stop.set()
        producer.join(timeout=10)
    atexit.register(halt)  # atexit runs while daemon threads still run normally, before finalization
    producer.start()
    try:
        while not isinstance(item := batches.get(), BaseException):
            pair, epoch = item
            pair = pair.to(device, non_blocking=(device.type == "cuda"))  # only CUDA copies from pinned memory
            yield pair[0], pair[1], epoch
        raise item
    finally:
        atexit.unregister(halt)
        halt()

# ---------------------------------------------------------------------------
# Work: what a CPU's budget counts
# ---------------------------------------------------------------------------

def step_flops(model, x, y):
    """FLOPs of one forward and backward of model(x, y) as torch's FlopCounterMode counts them: matmuls and
    attention, whatever the model's code. Counted here, not by train.py's formula, so the budget stays honest
    when the model changes. Leaves no gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    # the CPU's fused attention kernel is invisible to the counter; the math one does the same products
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()

# ---------------------------------------------------------------------------
# Evaluation: the fixed metric. DO NOT CHANGE.
# ---------------------------------------------------------------------------

def eval_rows(tokenizer, T=None):
    """The fixed validation rows: one pass over the val split, packed, first EVAL_TOKENS // T rows."""
    T = T or MAX_SEQ_LEN
    docs = iter_documents(token_files("val"), tokenizer.get_bos_token_id(), epochs=1)
    rows = [r for r, _ in itertools.islice(pack_rows(docs, 1, T), EVAL_TOKENS // T)]
    if not rows:
        raise SystemExit("the validation split is empty: run `uv run prepare.py` again")
    return np.concatenate(rows)

@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte: summed cross-entropy (nats) of every target token with a byte length > 0, divided by
    ln 2 times the summed byte lengths of those tokens. Independent of vocab size and of batch_size."""
    device = next(model.parameters()).device
    token_bytes = get_token_bytes("cpu").long()
    rows = torch.from_numpy(eval_rows(tokenizer))
    total_nats, total_bytes = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = rows[i:i + batch_size, :-1], rows[i:i + batch_size, 1:]
        # sums in float64 on the host (MPS has no float64): exact to the model's own precision, any batch_size
        loss = model(x.to(device), y.to(device), reduction="none").reshape(y.shape).cpu().double()
        nbytes = token_bytes[y]
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def print_summary(meta):
    root = dataset_dir(meta["name"])
    shards = [root / "shards" / s for s in meta["train"]]
    print("---")
    print(f"dataset:     {dataset_label(meta['name'])}")
    print(f"train:       {len(shards)} shards, {sum(p.stat().st_size for p in shards) / 1e6:.1f} MB")
    print(f"val:         {meta['val']}, {meta['val_tokens']:,} tokens")
    print(f"tokenizer:   {root / 'tokenizer'} (vocab {meta['vocab_size']})")
    print(f"profile:     {PROFILE} ({PROFILE_REASON}): context {MAX_SEQ_LEN}, eval tokens {EVAL_TOKENS:,}")
    rows = len(eval_rows(Tokenizer.from_directory(root / "tokenizer")))
    if rows < EVAL_TOKENS // MAX_SEQ_LEN:
        print(f"WARNING: val fills only {rows} rows of {MAX_SEQ_LEN} tokens, fewer than the "
              f"{EVAL_TOKENS // MAX_SEQ_LEN} that EVAL_TOKENS asks for: evaluate_bpb scores them all")

def main():
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch.")
    parser.add_argument("--dataset", choices=["climbmix", "stdlib"], default="climbmix",
                        help="climbmix (downloaded) or stdlib (built in, offline)")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="your own corpus: a folder or file of .parquet (column text), .jsonl (field text), .txt")
    parser.add_argument("--num-shards", type=int, default=10, help="climbmix training shards (-1 = all)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    args = parser.parse_args()
    if args.num_shards == 0 or args.num_shards < -1:
        parser.error("--num-shards must be a positive number or -1 (all)")
    print(f"Cache: {CACHE_DIR}")
    if args.source:
        source, files = corpus_files(args.source)
        name = "from-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", source.stem).strip("-.") or "corpus")
        meta = prepare_local(name, corpus_documents(files), dict(source=str(source.resolve())))
    elif args.dataset == "stdlib":
        meta = prepare_local("stdlib", stdlib_documents(),
                             dict(source="Python standard library", python=platform.python_version()))
    else:
        meta = prepare_climbmix(MAX_SHARD if args.num_shards == -1 else args.num_shards, args.download_workers)
    print_summary(meta)

if __name__ == "__main__":
    main()
