"""Shared fixtures and helpers: a small dataset of stdlib sources, prepared once per test session into a temporary
cache; a naive float64 attention and random q, k, v for the attention tests."""

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare

REPO = Path(__file__).resolve().parent.parent

# A shell starts a background job (`pytest &`, nohup) with SIGINT ignored, and every child inherits that: the tests
# that Ctrl-C launch.py or campaign.py would wait forever. A handler here makes each child start with SIGINT's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every process that compiles checks each SIMD instruction set inductor may use by starting a python that imports
# torch: ~2.5 s a check, up to 6 of them on an AVX-512 CPU, in each of the suite's ~20 train.py runs. This skips
# the base check of each (inductor's kernels build against torch's vector headers); the bf16 and VNNI checks remain.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")


SMALL_CHARS = 1_500_000  # of stdlib source: ~60 validation rows at context 256 (the whole stdlib fills 1024)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, request):
    """A prepared dataset for the tests that run train.py: the running Python's stdlib sources up to SMALL_CHARS, in
    600-character pieces, through `prepare.py --from`. Real code, so a tiny model learns in seconds, and a small
    validation split, so each run's evaluate_bpb takes ~2 s instead of ~20. Built once per session, not once per
    pytest-xdist worker: the workers share their base folder's parent, and the first to take the lock builds it.
    Tests only read it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if hasattr(request.config, "workerinput") else root  # workerinput: an xdist worker
    cache, corpus, done = root / "small-cache", root / "small.jsonl", root / "small-cache.prepared"
    with open(root / "small-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            pieces, size = [], 0
            for _, text in prepare.stdlib_documents():
                pieces += prepare.chunk_text(text)
                size += len(text)
                if size >= SMALL_CHARS:
                    break
            corpus.write_text("".join(json.dumps({"text": piece}) + "\n" for piece in pieces))
            env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
            result = subprocess.run([sys.executable, "prepare.py", "--from", str(corpus)], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            done.touch()
    return cache


# --- attention helpers shared by test_runtime.py, test_model.py and test_cuda.py ---------------------------

def naive_attention(q, k, v, window):
    """float64 softmax(q k^T / sqrt(D)) v, query t seeing keys t-window..t; (B, T, H, D), kv heads shared."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)  # query head h reads kv head h // (H / Hkv)
    v = v.repeat_interleave(H // v.size(2), dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    t, s = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    allowed = (s <= t) & (t - s <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def random_qkv(B=2, T=48, H=4, Hkv=2, D=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype),
            torch.randn(B, T, Hkv, D, generator=g, device=device, dtype=dtype),
            torch.randn(B, T, Hkv, D, generator=g, device=device, dtype=dtype))
