"""
The bench scripts, run as a user runs them (subprocesses on a prepared stdlib cache) with their smallest
arguments: each finishes and writes its JSON, and bad arguments stop with one line naming the fix.
bench/device_check.sh --dry-run runs the GPU check's steps on the CPU, tiny, so the script cannot rot while no
GPU is lent.

Run: uv run pytest tests/test_bench.py      (about 2-3 minutes on 2 cores)
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["--edit", "DEPTH=2", "--edit", "ASPECT_RATIO=32", "--edit", "HEAD_DIM=32", "--edit",
        "TOTAL_BATCH_SIZE=2**11", "--edit", "DEVICE_BATCH_SIZE=8"]


def run(args, cache, timeout=900, **env):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "AUTORESEARCH_CACHE": str(cache), "PYTHON": sys.executable, **env})


def test_device_check_dry_run_writes_every_step(stdlib_cache, tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "bench/device_check.sh", "--dry-run"], stdlib_cache, OUT=str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["tests"]["tests"] > 0 and report["tests"]["failed"] == [], report["tests"]
    assert [r["backend"] for r in report["gpu"]["rows"]] == ["sdpa"] and report["gpu"]["rows"][0]["ms_per_step"] > 0
    assert report["memory"]["rows"][0]["micro_batch"] == 4  # CPU: no fitting, the tiny config's micro-batch
    assert math.isfinite(float(report["train"]["val_bpb"])) and report["train"]["device"] == "cpu"
    assert (out / "device_check.log").read_text().count("[") >= 4  # a time stamp per step


def test_device_check_rejects_unknown_arguments(tmp_path):
    result = run(["bash", "bench/device_check.sh", "--dry"], tmp_path, OUT=str(tmp_path))
    assert result.returncode == 2 and "usage" in result.stderr


def test_gpu_bench_validates_arguments(tmp_path):
    for args, message in ((["--warmup", "0"], "must be at least 1"), (["--backends", "fa2"], "choose from")):
        result = run([sys.executable, "bench/gpu.py", *args], tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr


def test_noise_bench_smallest_run(stdlib_cache, tmp_path):
    out = tmp_path / "noise.json"
    result = run([sys.executable, "bench/noise.py", "--repeats", "1", "--seeds", "0", "--budget", "2", *TINY,
                  "--out", str(out), "--logs", str(tmp_path)], stdlib_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["runs"]] == [42] and report["edits"]["DEPTH"] == "2"
    assert report["groups"]["same seed"]["runs"] == 1 and report["groups"]["same seed"]["std"] is None
    run_ = report["runs"][0]
    assert math.isfinite(run_["val_bpb"]) and run_["num_steps"] > 10 and run_["precision"]


def test_noise_and_sweep_reject_bad_arguments(tmp_path):
    for args, message in (([sys.executable, "bench/noise.py", "--edit", "DEPTHS=2"], "no constant DEPTHS"),
                          ([sys.executable, "bench/noise.py", "--repeats", "0"], "at least 1"),
                          ([sys.executable, "bench/cpu_defaults.py", "--only", "huge"], "unknown ['huge']")):
        result = run(args, tmp_path)
        assert result.returncode != 0 and message in result.stderr + result.stdout, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr, result.stderr[-1500:]
