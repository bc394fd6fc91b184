"""Shared fixtures: the built-in stdlib dataset, prepared once per test session into a temporary cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory, worker_id):
    """Prepared once per session: under pytest-xdist (pyproject's -n 2) by whichever worker asks first, in the
    session's folder above the workers' own, while the other waits on the lock."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    cache = root / "stdlib-cache"
    with FileLock(str(root / "stdlib-cache.lock")):
        if not (cache / "prepared").exists():
            result = subprocess.run([sys.executable, "prepare.py", "--dataset", "stdlib"], cwd=REPO,
                                    capture_output=True, text=True, timeout=900,
                                    env={**os.environ, "AUTORESEARCH_CACHE": str(cache)})
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            (cache / "prepared").touch()
    return cache

