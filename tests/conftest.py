"""Shared fixtures: the built-in stdlib dataset, prepared once per test session into a temporary cache."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell starts a background job (`pytest &`, nohup) with SIGINT ignored, and every child inherits that: the tests
# that Ctrl-C launch.py or campaign.py would wait forever. A handler here makes each child start with SIGINT's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every process that compiles checks each SIMD instruction set inductor may use by starting a python that imports
# torch: ~2.5 s a check, up to 6 of them on an AVX-512 CPU, in each of the suite's ~20 train.py runs. This skips
# the base check of each (inductor's kernels build against torch's vector headers); the bf16 and VNNI checks remain.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = subprocess.run([sys.executable, "prepare.py", "--dataset", "stdlib"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return cache
