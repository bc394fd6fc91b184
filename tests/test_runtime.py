"""
Tests of runtime.py, the read-only runtime train.py calls: the attention backends against a naive float64
softmax attention with an explicit mask, the start-up decisions (device, precision, compile, attention, FA3
loading) with their reasons, the micro-batch fit through a fake trial step, the time budget's accounting against
a hand count, and the summary block. FlexAttention runs forward only on CPU (torch has no Flex backward there);
its backward, compiled Flex and FlashAttention-3 are checked by tests/test_cuda.py on a GPU.

Run: uv run pytest tests/test_runtime.py
"""

import math
import os
import platform
import shutil
import socket
import sys
import time
import types

import pytest
import torch

import prepare
import runtime
from conftest import naive_attention, random_qkv
from runtime import attention_flex, attention_sdpa

CUDA = torch.cuda.is_available()

WINDOW_CASES = [47, 24, 5, 0]  # full context (T-1), half, short, attend to self only


# --- attention backends ------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOW_CASES)
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_sdpa_matches_naive_forward_and_backward(window, Hkv):
    q, k, v = (t.requires_grad_() for t in random_qkv(Hkv=Hkv, seed=window + Hkv))
    y = attention_sdpa(q, k, v, window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y_ref = naive_attention(q64, k64, v64, window)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    grad_out = torch.randn_like(y_ref)
    (y.double() * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("window", WINDOW_CASES)
@pytest.mark.parametrize("Hkv", [4, 2])
def test_flex_matches_naive_forward_on_cpu(window, Hkv):
    q, k, v = random_qkv(Hkv=Hkv, seed=100 + window + Hkv)
    y = attention_flex(q.size(1), [window], "cpu")(q, k, v, window)
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, window), atol=2e-5, rtol=1e-5)


def test_flex_masks_of_one_model_keep_their_own_windows():
    """All windows of a model (SSSL: two sizes) built together, as Runtime.attention does: each mask keeps its own
    window. torch 2.10's Flex silently reused the first window for the others when they differed only in a
    default argument of the mask function."""
    q, k, v = random_qkv(seed=11)
    attend = attention_flex(q.size(1), WINDOW_CASES, "cpu")
    for window in WINDOW_CASES:
        torch.testing.assert_close(attend(q, k, v, window).double(), naive_attention(q, k, v, window),
                                   atol=2e-5, rtol=1e-5)


def test_flex_refuses_a_window_it_was_not_built_for():
    """A model whose windows changed after its masks were built fails with what to do, not a KeyError."""
    q, k, v = random_qkv(seed=12)
    attend = attention_flex(q.size(1), [5], "cpu")
    with pytest.raises(ValueError, match="windows \\[5\\]"):
        attend(q, k, v, 24)
    with pytest.raises(ValueError, match="T = 48"):
        attention_flex(32, [5], "cpu")(q, k, v, 5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_every_backend_takes_a_boolean_mask_as_the_window(backend):
    """A routed loop passes its own causal mask (MoR's gathered rows): every backend computes it, by SDPA."""
    q, k, v = random_qkv(seed=13)
    T = q.size(1)
    mask = torch.rand(T, T, generator=torch.Generator().manual_seed(1)) < 0.5
    mask |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    attend = runtime.Runtime("", "cpu", torch.float32, backend, False, False).attention(T, [T])
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = torch.einsum("bthd,bshd->bhts", q64, k64.repeat_interleave(2, dim=2)) / q.size(-1) ** 0.5
    expected = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, float("-inf")).softmax(-1),
                            v64.repeat_interleave(2, dim=2))
    torch.testing.assert_close(attend(q, k, v, mask[None, None]).double(), expected, atol=2e-5, rtol=1e-5)


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="fa3, flex, sdpa"):
        runtime.Runtime("", "cpu", torch.float32, "xformers", False, False).attention(32, [32])


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [24, 5])
def test_sliding_window_visibility(backend, window):
    """Perturbing key/value position s changes exactly the outputs t with s <= t <= s + window."""
    q, k, v = random_qkv(seed=7)
    T = q.size(1)
    attend = runtime.Runtime("", "cpu", torch.float32, backend, False, False).attention(T, [window])
    base = attend(q, k, v, window)
    t = torch.arange(T)
    for s in (0, 3, T // 2, T - 1):
        k2, v2 = k.clone(), v.clone()
        k2[:, s] += 1.0
        v2[:, s] += 1.0
        changed = (attend(q, k2, v2, window) - base).abs().amax(dim=(0, 2, 3)) > 1e-5
        assert torch.equal(changed, (t >= s) & (t - s <= window)), f"position {s}"


# --- start-up decisions ------------------------------------------------------------------------------------

def test_pick_dtype_on_cuda_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert runtime.pick_dtype("cuda")[0] == torch.float32  # a V100: bf16 would be emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.pick_dtype("cuda")[0] == torch.bfloat16


def test_cpu_precision_follows_the_profile_not_a_timing(monkeypatch):
    monkeypatch.setattr(runtime, "matmul_seconds", lambda device, dtype: pytest.fail("a CPU must not be timed"))
    monkeypatch.setattr(runtime, "PROFILE", "cpu-bf16")
    assert runtime.pick_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(runtime, "PROFILE", "cpu")
    assert runtime.pick_dtype("cpu")[0] == torch.float32


@pytest.mark.parametrize("bf16_over_fp32, expected", [(0.79, torch.bfloat16), (0.8, torch.float32),
                                                      (1.5, torch.float32), (50.0, torch.float32)])
def test_probe_picks_bf16_only_when_clearly_faster(monkeypatch, bf16_over_fp32, expected):
    """MPS decides by timing: bf16 only below 0.8x the fp32 time; a bf16 over 2x slower is timed once."""
    calls = []
    def fake(device, dtype):
        calls.append(dtype)
        return 1.0 if dtype == torch.float32 else bf16_over_fp32
    monkeypatch.setattr(runtime, "matmul_seconds", fake)
    assert runtime.pick_dtype("mps")[0] == expected
    assert len(calls) == (2 if bf16_over_fp32 > 2 else 6)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")) is None,
                    reason="no C++ compiler on this machine")
def test_cpu_compiles_the_model_with_a_cxx_compiler():
    """Without one the model runs eager: tests/test_train_e2e.py runs train.py with CXX=/bin/false."""
    assert runtime.pick_compile("cpu")[:2] == (True, False)


def test_peak_memory_is_a_peak_or_none():
    """Metal reports only the memory in use now: None, so the summary prints n/a rather than call it a peak."""
    assert runtime.peak_memory_mb("mps") is None and runtime.peak_memory_mb("cpu") > 0


def test_real_probe_is_quick():
    t0 = time.time()
    dtype, why = runtime.probe_dtype("cpu")
    assert dtype in (torch.float32, torch.bfloat16) and why
    assert time.time() - t0 < 10


def test_profile_from_cpu_flags(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prepare, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert prepare.choose_profile()[0] == "cpu-bf16"
    monkeypatch.setattr(prepare, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # bf16 1.7x slower there
    assert prepare.choose_profile()[0] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prepare.choose_profile()[0] == "gpu"


def test_cpu_flags_reads_this_machine():
    flags = prepare.cpu_flags()
    if os.path.exists("/proc/cpuinfo") and platform.machine() == "x86_64":
        assert "sse2" in flags


def test_nvidia_gpu_that_cuda_cannot_use_stops_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "nvidia_driver", lambda: "535.104.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit) as exit:
        runtime.pick_device()
    message = str(exit.value)
    assert "535.104.05" in message and "13.0" in message and "580" in message and "CUDA_VISIBLE_DEVICES=" in message
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="CPU-only build"):
        runtime.pick_device()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hiding the GPU on purpose trains on the CPU
    assert runtime.pick_device()[0] in ("cpu", "mps")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(runtime, "nvidia_driver", lambda: None)
    assert runtime.pick_device()[0] in ("cpu", "mps")


def test_nvidia_driver_version_from_proc(monkeypatch, tmp_path):
    real_open = open
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
                       "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 2025\nGCC version:  gcc version 12.3.0\n")
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        version if path == "/proc/driver/nvidia/version" else path, *a, **k))
    assert runtime.nvidia_driver() == "570.133.20"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA GH200 480GB", 989.5e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12), ("Tesla T4", None)])
def test_peak_flops_by_exact_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert runtime.peak_flops("cuda") == peak
    assert runtime.peak_flops("cpu") is None


def test_pick_attention_off_cuda_is_sdpa():
    assert runtime.pick_attention("cpu")[:2] == ("sdpa", None)
    assert runtime.pick_attention("mps")[:2] == ("sdpa", None)


class FakeKernels:
    """Stands in for the `kernels` package: get_kernel with the installed signature, records its calls."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail
        self.module = type("Kernel", (), {"flash_attn_interface": object()})()

    def get_kernel(self, repo_id, *, revision=None, version=None, backend=None, user_agent=None,
                   trust_remote_code=False, check_arch=True):
        self.calls.append(dict(repo_id=repo_id, revision=revision, version=version,
                               trust_remote_code=trust_remote_code))
        if version is None and revision is None:  # kernels >= 0.15
            raise ValueError("A kernel version or revision must be specified")
        if self.fail:
            raise self.fail
        return self.module


@pytest.fixture
def fake_kernels(monkeypatch):
    fake = FakeKernels()
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=fake.get_kernel))
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=1.5: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_fa3_loader_asks_the_trusted_repo_for_version_1(fake_kernels):
    fa3, why = runtime.load_fa3()
    assert fa3 is fake_kernels.module.flash_attn_interface, why
    assert fake_kernels.calls == [dict(repo_id="kernels-community/flash-attn3", revision=None, version=1,
                                       trust_remote_code=False)]
    assert "kernels-community/flash-attn3" in why


def test_fa3_loader_reports_an_exception_as_the_reason(fake_kernels):
    fake_kernels.fail = RuntimeError("no build for torch211-cxx11-cu130-x86_64-linux\nmore detail")
    fa3, why = runtime.load_fa3()
    assert fa3 is None
    assert "RuntimeError: no build for torch211-cxx11-cu130-x86_64-linux" in why and "more detail" not in why


def test_fa3_that_fails_its_check_falls_back_to_flex_with_the_reason(fake_kernels, monkeypatch):
    monkeypatch.setattr(runtime, "fa3_problem", lambda fa3: "RuntimeError: mixed dtypes")
    attention, fa3, why = runtime.pick_attention("cuda")
    assert attention == "flex" and fa3 is None
    assert "kernels-community/flash-attn3" in why and "mixed dtypes" in why


def test_fa3_loading_offline_gives_up_within_seconds(monkeypatch):
    """With the hub unreachable, load_fa3 sets HF_HUB_OFFLINE before `kernels` reads it and fails fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # registers the variable for restoration, then clear it
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=1.5: False)
    t0 = time.time()
    fa3, why = runtime.load_fa3()
    assert time.time() - t0 < 5
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    if not CUDA:
        assert fa3 is None and why


def test_hub_probe_follows_hf_endpoint(monkeypatch):
    """A lab's mirror in HF_ENDPOINT is what gets probed: here a listening local port, then a closed one."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert runtime.hub_reachable()
    server.close()
    assert not runtime.hub_reachable()


# --- micro-batch fitting (CUDA), through a fake trial step ---------------------------------------------------

def fake_trial(max_rows):
    """A trial step that runs out of memory above max_rows, recording the sizes tried."""
    tried = []
    def try_rows(rows):
        tried.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
    return try_rows, tried


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    monkeypatch.setattr(runtime, "cuda_free_gb", lambda: 23.6)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.mark.parametrize("fits, expected", [(128, 128), (127, 64), (64, 64), (40, 32), (1, 1)])
def test_micro_batch_is_the_largest_power_of_two_that_fits(fake_cuda_memory, fits, expected):
    try_rows, tried = fake_trial(fits)
    rows, why = runtime.pick_micro_batch("cuda", try_rows, 128, 2**19, 2048)
    assert rows == expected
    assert tried == [r for r in (128, 64, 32, 16, 8, 4, 2, 1) if r >= expected]
    assert ("128 rows do not fit in 23.6 GB free" in why) == (expected < 128)
    assert 2**19 % (rows * 2048) == 0


def test_micro_batch_nothing_fits_names_the_constants(fake_cuda_memory):
    try_rows, tried = fake_trial(0)
    with pytest.raises(SystemExit) as exit:
        runtime.pick_micro_batch("cuda", try_rows, 128, 2**19, 2048)
    assert tried[-1] == 1 and "DEPTH" in str(exit.value) and "ASPECT_RATIO" in str(exit.value)


def test_micro_batch_skips_sizes_that_do_not_divide_the_batch(fake_cuda_memory):
    try_rows, tried = fake_trial(40)
    rows, _ = runtime.pick_micro_batch("cuda", try_rows, 96, 96 * 2048, 2048)
    assert tried == [96, 32] and rows == 32  # 64 does not divide 96 rows


def test_micro_batch_off_cuda_is_the_constant():
    assert runtime.pick_micro_batch("cpu", lambda rows: pytest.fail("no trial off CUDA"), 32, 2**13, 256)[0] == 32


def test_batch_that_rows_do_not_divide_is_refused_naming_the_constants():
    rt = runtime.Runtime("", "cpu", torch.float32, "sdpa", False, False)
    with pytest.raises(SystemExit, match="TOTAL_BATCH_SIZE 8000 is not a multiple of DEVICE_BATCH_SIZE"):
        runtime.fit_micro_batch(rt, None, None, 32, 8000, 256)



# --- the time budget and the summary block ------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    """One matmul per token of a one-hot input: a forward (2 D^2 FLOPs a token) and the weight's gradient (2 D^2;
    the input needs none) make 4 * B * T * D * D, counted by hand."""

    def __init__(self, D=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(D, D))
        self.D = D

    def forward(self, x, y):
        return (torch.nn.functional.one_hot(x, self.D).float() @ self.weight).square().mean()


def cpu_runtime():
    return runtime.Runtime("test-data", "cpu", torch.float32, "sdpa", False, False, t_start=time.time())


def test_cpu_budget_charges_each_step_its_counted_work_after_the_free_steps(monkeypatch, capsys):
    """A step costs its rows' counted FLOPs at CPU_FLOPS; the first FREE_STEPS cost nothing; the run stops at the
    first step that reaches TIME_BUDGET, whatever wall time the steps took."""
    monkeypatch.setattr(runtime, "CPU_FLOPS", 1e6)
    monkeypatch.setattr(runtime, "TIME_BUDGET", 10.0)
    x = torch.randint(0, 16, (4, 8))
    budget = runtime.Budget(cpu_runtime(), CountingModel(), x, x, rows_per_step=4 * 3, tokens_per_step=96,
                            flops_per_token=6 * 16 * 16)
    step_seconds = 4 * 16 * 16 * 8 * 12 / 1e6  # 8 tokens a row, 12 rows a step: 0.098304 s of the budget
    assert budget.step_seconds == pytest.approx(step_seconds, rel=1e-12)
    assert f"= {step_seconds:.3f}s of the budget: {11 + math.ceil(10 / step_seconds)} steps" in capsys.readouterr().out
    step, done, progress = 0, False, []
    while not done:
        budget.start_step()
        progress.append(budget.progress)
        done = budget.end_step(step, loss=2.0, lrm=1.0, epoch=1)
        step += 1
    assert step == budget.steps == runtime.Budget.FREE_STEPS + math.ceil(10 / step_seconds)  # 11 free + 102 charged
    assert budget.seconds == pytest.approx(102 * step_seconds)
    assert progress[:12] == [0.0] * 12 and progress[12] == pytest.approx(step_seconds / 10)


def test_wall_budget_charges_wall_time_off_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "TIME_BUDGET", 0.05)
    monkeypatch.setattr(runtime, "synchronize", lambda device: None)
    rt = runtime.Runtime("test-data", "cuda", torch.float32, "sdpa", False, False, t_start=time.time())
    budget = runtime.Budget(rt, None, None, None, 1, 1, 1)
    assert budget.step_seconds is None
    for step in range(11):
        budget.start_step()
        assert not budget.end_step(step, 2.0, 1.0, 1) and budget.seconds == 0.0
    budget.start_step()
    time.sleep(0.06)
    assert budget.end_step(11, 2.0, 1.0, 1) and budget.seconds >= 0.06


@pytest.mark.parametrize("loss", [math.nan, math.inf, 101.0])
def test_a_diverging_step_fails_the_run(loss, capsys):
    budget = runtime.Budget(cpu_runtime(), CountingModel(), *[torch.zeros(1, 8, dtype=torch.long)] * 2, 1, 8, 1)
    budget.start_step()
    with pytest.raises(SystemExit) as exit:
        budget.end_step(3, loss, 1.0, 1)
    assert exit.value.code == 1 and "\nFAIL: training loss" in capsys.readouterr().out


def test_summary_block_is_fixed_and_counts_from_the_budget(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "CPU_FLOPS", 1e6)
    monkeypatch.setattr(runtime, "TIME_BUDGET", 3.0)
    x = torch.randint(0, 16, (1, 8))
    rt = cpu_runtime()
    budget = runtime.Budget(rt, CountingModel(), x, x, 1, tokens_per_step=2048, flops_per_token=1)
    step, done = 0, False
    while not done:
        budget.start_step()
        done = budget.end_step(step, 2.0, 1.0, 1)
        step += 1
    runtime.print_summary(rt, budget, 1.2345678, 0.5, num_params=1_234_567, depth=4)
    lines = capsys.readouterr().out.splitlines()
    block = dict(line.split(":", 1) for line in lines[lines.index("---") + 1:])
    assert list(block) == ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                           "total_tokens_M", "num_steps", "num_params_M", "depth", "device", "attention", "profile",
                           "dataset", "precision", "time_budget"]
    assert all(line.index(line.split()[-1]) == 18 for line in lines[lines.index("---") + 1:])  # values in column 18
    assert block["val_bpb"].strip() == "1.234568" and int(block["num_steps"]) == step
    assert float(block["total_tokens_M"]) == round(step * 2048 / 1e6, 1) and block["mfu_percent"].strip() == "n/a"
    assert block["dataset"].strip() == "test-data" and block["time_budget"].strip() == "3"
