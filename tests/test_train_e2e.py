"""
End-to-end tests of `train.py` on the CPU, as subprocesses, on conftest.py's small dataset of stdlib sources
(prepared once per session into a temporary cache): a copy of train.py whose constants are rewritten to a tiny model
(train.py itself has no test hooks) under AUTORESEARCH_TIME_BUDGET of a few seconds. Checks: the full summary block
in its fixed order with a finite val_bpb clearly below the untrained model's (a near-uniform predictor: log2(vocab)
bits per token, computed here over the same validation rows), training that stops within a step of the budget,
Newton-Muon refreshed at its interval, FAIL and exit 1 on a diverging run, eager with no C++ compiler, and clear
messages naming prepare.py or the offending constant.

Run: uv run pytest tests/test_train_e2e.py      (about 2 minutes on 2 cores)
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "device", "attention", "profile", "dataset", "precision",
                "time_budget"]
TINY = dict(DEPTH="2", ASPECT_RATIO="32", HEAD_DIM="32", TOTAL_BATCH_SIZE="2**11", DEVICE_BATCH_SIZE="8")


def env_for(cache, budget="4"):
    return {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_TIME_BUDGET": budget,
            "AUTORESEARCH_PROFILE": "cpu", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def cache(small_cache):
    return small_cache


def train_copy(tmp_path, **constants):
    """A copy of train.py with constants rewritten (every `NAME = ...` line, at any indentation)."""
    path = tmp_path / "train.py"
    path.write_text(harness.edit_constants((REPO / "train.py").read_text(), {**TINY, **constants}))
    return path


def run_train(path, cache, budget="4", **env):
    return subprocess.run([sys.executable, str(path)], cwd=REPO, env={**env_for(cache, budget), **env},
                          capture_output=True, text=True, timeout=600)


def uniform_bpb(cache):
    """val_bpb of a model that predicts the uniform distribution, over the rows evaluate_bpb scores."""
    code = ("import math, torch; from prepare import *; tok = Tokenizer.from_directory(); "
            "y = torch.from_numpy(eval_rows(tok))[:, 1:]; nbytes = get_token_bytes()[y]; "
            "print((nbytes > 0).sum().item() * math.log2(tok.get_vocab_size()) / nbytes.sum().item())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_for(cache), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split()[-1])


def summary(stdout):
    lines = stdout.splitlines()
    assert "---" in lines, stdout[-3000:]
    block = lines[lines.index("---") + 1:]
    assert len(block) >= len(SUMMARY_KEYS), block
    pairs = [re.fullmatch(r"(\w+):\s+(\S+)", line) for line in block[:len(SUMMARY_KEYS)]]
    assert all(pairs), block
    assert all(line.index(m.group(2)) == 18 for line, m in zip(block, pairs)), "values start in column 18"
    return {m.group(1): m.group(2) for m in pairs}, [m.group(1) for m in pairs]


def assert_stops_at_budget(values, budget, stdout):
    """On a CPU every step costs the work: line's seconds against the budget, whatever the machine's load, and
    training stops at the first step that reaches the budget. 0.05 s is training_seconds' rounding."""
    step_seconds = float(re.search(r"^work: .* = ([\d.]+)s of the budget", stdout, flags=re.M).group(1))
    seconds, counted = float(values["training_seconds"]), int(values["num_steps"]) - 11  # 11 warm-up steps
    assert seconds == pytest.approx(counted * step_seconds, abs=0.05 + counted * 0.0005)  # 0.0005: printed rounding
    assert budget <= seconds + 0.05 and seconds < budget + step_seconds + 0.05, (seconds, step_seconds)


def test_short_run_prints_summary_and_learns(cache, tmp_path):
    """A looped model (two loops) with Newton-Muon, so the run also takes the loop's optional paths: its
    statistics refreshed every NEWTON_REFRESH_STEPS steps (5 here), which a print added after the refresh call in
    the copy reports."""
    path = train_copy(tmp_path, N_LOOPS="2", MATRIX_OPTIMIZER='"newton_muon"', NEWTON_REFRESH_STEPS="5")
    call = "refresh_newton_muon(optimizer, input_second_moments(model, x))"
    source = path.read_text()
    assert source.count(call) == 1
    path.write_text(source.replace(call, call + "; print(f'\\nrefreshed at step {step}')"))
    result = run_train(path, cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    values, keys = summary(result.stdout)
    assert keys == SUMMARY_KEYS
    val_bpb = float(values["val_bpb"])
    assert math.isfinite(val_bpb)
    assert val_bpb < 0.8 * uniform_bpb(cache)
    assert int(values["num_steps"]) > 10 and int(values["depth"]) == 2
    refreshed = [int(s) for s in re.findall(r"^refreshed at step (\d+)$", result.stdout, flags=re.M)]
    assert refreshed == list(range(4, int(values["num_steps"]), 5))  # the 5th, 10th, 15th, ... step
    assert float(values["peak_vram_mb"]) > 0
    assert_stops_at_budget(values, 4.0, result.stdout)
    assert values["time_budget"] == "4" and values["precision"] in ("fp32", "bf16")
    assert values["profile"] == "cpu" and values["dataset"].startswith("from-small-")  # the corpus, content hash
    if values["device"] == "cpu":  # no known bf16 peak: MFU would be a made-up number
        assert values["attention"] == "sdpa" and values["mfu_percent"] == "n/a"
    log = result.stdout.splitlines()
    for decision in ("device:", "precision:", "attention:", "compile:", "budget:", "work:"):  # with the reason
        assert any(line.startswith(decision) and len(line) > 20 for line in log), decision
    assert "step 00010 (" in result.stdout  # the live progress line


def test_diverging_run_fails_fast_and_runs_eager_without_a_cxx_compiler(cache, tmp_path):
    """CXX=/bin/false, as on a machine with no C++ compiler: the model runs eager (inductor would die at the first
    step) and the compile: line says why; then the loss explodes at once and the run FAILs."""
    path = train_copy(tmp_path, MATRIX_LR="1e30", EMBEDDING_LR="1e30", UNEMBEDDING_LR="1e30")
    result = run_train(path, cache, budget="60", CXX="/bin/false")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\nFAIL" in result.stdout and "---" not in result.stdout.splitlines()
    compile_line = next(line for line in result.stdout.splitlines() if line.startswith("compile:"))
    assert "eager" in compile_line and "/bin/false" in compile_line


def test_indivisible_batch_is_a_clear_error(cache, tmp_path):
    result = run_train(train_copy(tmp_path, TOTAL_BATCH_SIZE="3000"), cache)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "TOTAL_BATCH_SIZE" in result.stderr and "DEVICE_BATCH_SIZE" in result.stderr


def test_missing_data_names_prepare(tmp_path):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    result = run_train(REPO / "train.py", empty)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "prepare.py" in result.stderr


def test_unknown_matrix_optimizer_is_a_clear_error(cache, tmp_path):
    result = run_train(train_copy(tmp_path, MATRIX_OPTIMIZER='"lion"'), cache)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "MATRIX_OPTIMIZER" in result.stderr and "normuon" in result.stderr
