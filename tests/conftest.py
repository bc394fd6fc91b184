"""Shared fixtures: the built-in stdlib dataset, prepared once per test session into a temporary cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = subprocess.run([sys.executable, "prepare.py", "--dataset", "stdlib"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "AUTORESEARCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return cache
