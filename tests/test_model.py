"""
Model tests for train.py: shapes and finite loss, causality, sliding windows, value embeddings, initialisation,
and the start-up decisions. Every attention backend is checked against a naive float64 softmax attention with an
explicit mask, both alone and wired into the whole model.
FlexAttention runs forward only on CPU (torch has no Flex backward there); its backward, compiled Flex and
FlashAttention-3 are checked by tests/test_cuda.py on a GPU.

Run: uv run pytest tests/test_model.py
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import prepare
import train
from train import GPT, GPTConfig, attention_flex, attention_sdpa, has_ve, layer_windows, prepare_attention

CUDA = torch.cuda.is_available()


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


def tiny_config(**overrides):
    config = dict(sequence_len=32, vocab_size=96, n_layer=4, n_head=4, n_kv_head=4, n_embd=64,
                  window_pattern="SSSL", attention="sdpa")
    return GPTConfig(**{**config, **overrides})


def build(config, dtype=torch.float32, randomize=False, seed=0):
    """A model on the CPU; randomize=True replaces the zero/near-zero init so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(dtype)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
    return model


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
    prepare_attention("flex", q.size(1), [window], "cpu")
    y = attention_flex(q, k, v, window)
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, window), atol=2e-5, rtol=1e-5)


def test_flex_masks_of_one_model_keep_their_own_windows():
    """All windows of a model (SSSL: two sizes) prepared together, as train.py does: each mask keeps its own
    window. torch 2.10's Flex silently reused the first window for the others when they differed only in a
    default argument of the mask function."""
    q, k, v = random_qkv(seed=11)
    prepare_attention("flex", q.size(1), WINDOW_CASES, "cpu")
    for window in WINDOW_CASES:
        torch.testing.assert_close(attention_flex(q, k, v, window).double(), naive_attention(q, k, v, window),
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [24, 5])
def test_sliding_window_visibility(backend, window):
    """Perturbing key/value position s changes exactly the outputs t with s <= t <= s + window."""
    q, k, v = random_qkv(seed=7)
    T = q.size(1)
    prepare_attention(backend, T, [window], "cpu")
    attend = train.ATTENTION_BACKENDS[backend]
    base = attend(q, k, v, window)
    t = torch.arange(T)
    for s in (0, 3, T // 2, T - 1):
        k2, v2 = k.clone(), v.clone()
        k2[:, s] += 1.0
        v2[:, s] += 1.0
        changed = (attend(q, k2, v2, window) - base).abs().amax(dim=(0, 2, 3)) > 1e-5
        assert torch.equal(changed, (t >= s) & (t - s <= window)), f"position {s}"


# --- the model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(window_pattern="L"), dict(window_pattern="SSSL"),
                                       dict(window_pattern="SSSL", n_kv_head=2), dict(n_kv_head=1, n_layer=3)])
def test_forward_backward_shapes_and_finite_loss(overrides):
    config = tiny_config(**overrides)
    model = build(config)
    idx = torch.randint(0, config.vocab_size, (3, config.sequence_len))
    targets = torch.randint(0, config.vocab_size, (3, config.sequence_len))
    assert model(idx).shape == (3, config.sequence_len, config.vocab_size)
    loss = model(idx, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1  # lm_head ~ N(0, 0.001): near-uniform at init
    per_token = model(idx, targets, reduction="none")
    assert per_token.numel() == 3 * config.sequence_len
    torch.testing.assert_close(per_token.mean(), loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_model_with_backend_matches_model_with_naive_attention(backend):
    config = tiny_config(n_kv_head=2, attention=backend)
    model = build(config, randomize=True, seed=3)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    with torch.no_grad():
        logits = model(idx)
        for block in model.blocks:
            block.attn.attend = lambda q, k, v, window: naive_attention(q, k, v, window).to(q.dtype)
        reference = model(idx)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["L", "SSSL"])
def test_causality(pattern):
    """Changing tokens after position t never changes the logits at or before t."""
    config = tiny_config(window_pattern=pattern, n_kv_head=2)
    model = build(config, randomize=True, seed=5)
    T = config.sequence_len
    idx = torch.randint(0, config.vocab_size, (2, T))
    with torch.no_grad():
        logits = model(idx)
        for t in (0, 10, T - 2):
            changed = idx.clone()
            changed[:, t + 1:] = torch.randint(0, config.vocab_size, (2, T - t - 1))
            after = model(changed)
            torch.testing.assert_close(after[:, :t + 1], logits[:, :t + 1], atol=1e-5, rtol=1e-5)
            assert (after[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-3  # the change does reach later positions


def test_layer_windows_follow_pattern_and_last_layer_is_full():
    assert layer_windows(tiny_config(window_pattern="SSSL", n_layer=6)) == [16, 16, 16, 32, 16, 32]
    assert layer_windows(tiny_config(window_pattern="L", n_layer=3)) == [32, 32, 32]
    assert layer_windows(tiny_config(window_pattern="S", n_layer=2)) == [16, 32]
    with pytest.raises(ValueError, match="S and L"):
        layer_windows(tiny_config(window_pattern="SXL"))


def test_value_embeddings_alternate_and_include_the_last_layer():
    for n_layer in range(1, 8):
        with_ve = [i for i in range(n_layer) if has_ve(i, n_layer)]
        assert with_ve[-1] == n_layer - 1
        assert all(b - a == 2 for a, b in zip(with_ve, with_ve[1:]))
        assert len(with_ve) == (n_layer + 1) // 2
        model = GPT(tiny_config(n_layer=n_layer))
        assert sorted(int(i) for i in model.value_embeds) == with_ve
        assert [i for i, b in enumerate(model.blocks) if b.attn.ve_gate is not None] == with_ve


def test_value_embedding_gate_starts_neutral():
    """At init the values seen by attention are exactly c_v(x) + value_embedding(idx) (gate 2*sigmoid(0) = 1)."""
    config = tiny_config(n_kv_head=2)
    model = build(config)
    attn = model.blocks[-1].attn
    seen = {}
    def capture(q, k, v, window):
        seen["v"] = v
        return q
    attn.attend = capture
    x = torch.randn(2, config.sequence_len, config.n_embd)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    ve = model.value_embeds[str(config.n_layer - 1)](idx)
    attn(x, ve, model.cos, model.sin, config.sequence_len)
    torch.testing.assert_close(seen["v"], (attn.c_v(x) + ve).view_as(seen["v"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_follows_the_compute_dtype_and_reference_scales(dtype):
    model = build(tiny_config(n_embd=128, n_head=2, n_kv_head=2), dtype=dtype)
    assert model.wte.weight.dtype == dtype and model.cos.dtype == dtype and model.sin.dtype == dtype
    assert all(ve.weight.dtype == dtype for ve in model.value_embeds.values())
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert abs(model.wte.weight.float().std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0002
    bound = (3 / 128) ** 0.5
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        assert block.mlp.c_fc.weight.abs().max() <= bound and block.attn.c_q.weight.abs().max() > 0.9 * bound
    assert torch.equal(model.resid_lambdas, torch.ones(4)) and torch.allclose(model.x0_lambdas, torch.full((4,), 0.1))


def test_model_config_rounds_width_up_to_whole_heads(monkeypatch):
    monkeypatch.setattr(train, "ASPECT_RATIO", 64)
    monkeypatch.setattr(train, "HEAD_DIM", 128)
    config = train.model_config(3, 8192)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (256, 2, 2)
    assert config.sequence_len == train.MAX_SEQ_LEN and config.window_pattern == train.WINDOW_PATTERN


# --- start-up decisions ------------------------------------------------------------------------------------

def test_pick_dtype_on_cuda_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert train.pick_dtype("cuda")[0] == torch.float32  # a V100: bf16 would be emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train.pick_dtype("cuda")[0] == torch.bfloat16


def test_cpu_precision_follows_the_profile_not_a_timing(monkeypatch):
    monkeypatch.setattr(train, "matmul_seconds", lambda device, dtype: pytest.fail("a CPU must not be timed"))
    monkeypatch.setattr(train, "PROFILE", "cpu-bf16")
    assert train.pick_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(train, "PROFILE", "cpu")
    assert train.pick_dtype("cpu")[0] == torch.float32


@pytest.mark.parametrize("bf16_over_fp32, expected", [(0.79, torch.bfloat16), (0.8, torch.float32),
                                                      (1.5, torch.float32), (50.0, torch.float32)])
def test_probe_picks_bf16_only_when_clearly_faster(monkeypatch, bf16_over_fp32, expected):
    """MPS decides by timing: bf16 only below 0.8x the fp32 time; a bf16 over 2x slower is timed once."""
    calls = []
    def fake(device, dtype):
        calls.append(dtype)
        return 1.0 if dtype == torch.float32 else bf16_over_fp32
    monkeypatch.setattr(train, "matmul_seconds", fake)
    assert train.pick_dtype("mps")[0] == expected
    assert len(calls) == (2 if bf16_over_fp32 > 2 else 6)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")) is None,
                    reason="no C++ compiler on this machine")
def test_cpu_compiles_the_model_with_a_cxx_compiler():
    """Without one the model runs eager: tests/test_train_e2e.py runs train.py with CXX=/bin/false."""
    assert train.pick_compile("cpu")[:2] == (True, False)


def test_peak_memory_is_a_peak_or_none():
    """Metal reports only the memory in use now: None, so the summary prints n/a rather than call it a peak."""
    assert train.peak_memory_mb("mps") is None and train.peak_memory_mb("cpu") > 0


def test_real_probe_is_quick():
    t0 = time.time()
    dtype, why = train.probe_dtype("cpu")
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
    monkeypatch.setattr(train, "nvidia_driver", lambda: "535.104.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit) as exit:
        train.pick_device()
    message = str(exit.value)
    assert "535.104.05" in message and "13.0" in message and "580" in message and "CUDA_VISIBLE_DEVICES=" in message
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="CPU-only build"):
        train.pick_device()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hiding the GPU on purpose trains on the CPU
    assert train.pick_device()[0] in ("cpu", "mps")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(train, "nvidia_driver", lambda: None)
    assert train.pick_device()[0] in ("cpu", "mps")


def test_nvidia_driver_version_from_proc(monkeypatch, tmp_path):
    real_open = open
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
                       "(dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 2025\nGCC version:  gcc version 12.3.0\n")
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        version if path == "/proc/driver/nvidia/version" else path, *a, **k))
    assert train.nvidia_driver() == "570.133.20"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA GH200 480GB", 989.5e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12), ("Tesla T4", None)])
def test_peak_flops_by_exact_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert train.peak_flops("cuda") == peak
    assert train.peak_flops("cpu") is None


def test_pick_attention_off_cuda_is_sdpa():
    assert train.pick_attention("cpu")[0] == "sdpa"
    assert train.pick_attention("mps")[0] == "sdpa"


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
    monkeypatch.setattr(train, "hub_reachable", lambda timeout=1.5: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_fa3_loader_asks_the_trusted_repo_for_version_1(fake_kernels):
    fa3, why = train.load_fa3()
    assert fa3 is fake_kernels.module.flash_attn_interface, why
    assert fake_kernels.calls == [dict(repo_id="kernels-community/flash-attn3", revision=None, version=1,
                                       trust_remote_code=False)]
    assert "kernels-community/flash-attn3" in why


def test_fa3_loader_reports_an_exception_as_the_reason(fake_kernels):
    fake_kernels.fail = RuntimeError("no build for torch211-cxx11-cu130-x86_64-linux\nmore detail")
    fa3, why = train.load_fa3()
    assert fa3 is None
    assert "RuntimeError: no build for torch211-cxx11-cu130-x86_64-linux" in why and "more detail" not in why


def test_fa3_that_fails_its_check_falls_back_to_flex_with_the_reason(fake_kernels, monkeypatch):
    monkeypatch.setattr(train, "fa3_problem", lambda: "RuntimeError: mixed dtypes")
    attention, why = train.pick_attention("cuda")
    assert attention == "flex" and train.FA3 is None
    assert "kernels-community/flash-attn3" in why and "mixed dtypes" in why


def test_fa3_loading_offline_gives_up_within_seconds(monkeypatch):
    """With the hub unreachable, load_fa3 sets HF_HUB_OFFLINE before `kernels` reads it and fails fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # registers the variable for restoration, then clear it
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(train, "hub_reachable", lambda timeout=1.5: False)
    t0 = time.time()
    fa3, why = train.load_fa3()
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
    assert train.hub_reachable()
    server.close()
    assert not train.hub_reachable()


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
    monkeypatch.setattr(train, "cuda_free_gb", lambda: 23.6)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(train, "MAX_SEQ_LEN", 2048)
    monkeypatch.setattr(train, "TOTAL_BATCH_SIZE", 2**19)
    monkeypatch.setattr(train, "DEVICE_BATCH_SIZE", 128)


@pytest.mark.parametrize("fits, expected", [(128, 128), (127, 64), (64, 64), (40, 32), (1, 1)])
def test_micro_batch_is_the_largest_power_of_two_that_fits(fake_cuda_memory, fits, expected):
    try_rows, tried = fake_trial(fits)
    rows, why = train.pick_micro_batch("cuda", try_rows)
    assert rows == expected
    assert tried == [r for r in (128, 64, 32, 16, 8, 4, 2, 1) if r >= expected]
    assert ("128 rows do not fit in 23.6 GB free" in why) == (expected < 128)
    assert train.TOTAL_BATCH_SIZE % (rows * train.MAX_SEQ_LEN) == 0


def test_micro_batch_nothing_fits_names_the_constants(fake_cuda_memory):
    try_rows, tried = fake_trial(0)
    with pytest.raises(SystemExit) as exit:
        train.pick_micro_batch("cuda", try_rows)
    assert tried[-1] == 1 and "DEPTH" in str(exit.value) and "ASPECT_RATIO" in str(exit.value)


def test_micro_batch_skips_sizes_that_do_not_divide_the_batch(fake_cuda_memory, monkeypatch):
    monkeypatch.setattr(train, "DEVICE_BATCH_SIZE", 96)
    monkeypatch.setattr(train, "TOTAL_BATCH_SIZE", 96 * 2048)
    try_rows, tried = fake_trial(40)
    rows, _ = train.pick_micro_batch("cuda", try_rows)
    assert tried == [96, 32] and rows == 32  # 64 does not divide 96 rows


def test_micro_batch_off_cuda_is_the_constant():
    assert train.pick_micro_batch("cpu", lambda rows: pytest.fail("no trial off CUDA"))[0] == train.DEVICE_BATCH_SIZE


def test_norm_keeps_its_input_dtype_when_rms_norm_upcasts(monkeypatch):
    """CUDA autocast runs rms_norm in fp32 (torch >= 2.12). Simulated here: q, k and v must still reach
    attention in one dtype, and the residual stream must stay in the embeddings' dtype."""
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda x, shape, *a, **k: real(x.float(), shape))
    seen = []
    def recording(q, k, v, window):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attention_sdpa(q, k, v, window)
    monkeypatch.setitem(train.ATTENTION_BACKENDS, "sdpa", recording)
    model = build(tiny_config(), dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(args[0].dtype))
    model(torch.randint(0, 96, (2, 32)))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    assert head_inputs == [torch.bfloat16]


def test_accumulated_micro_batches_give_the_batch_gradient():
    """The CPU twin of the CUDA test: 4 micro-batches of 4 rows, each loss / 4, against one batch of 16."""
    model = build(tiny_config(), randomize=True)
    idx = torch.randint(0, 96, (16, 33), generator=torch.Generator().manual_seed(5))
    x, y = idx[:, :-1], idx[:, 1:]
    model(x, y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for i in range(0, 16, 4):
        (model(x[i:i + 4], y[i:i + 4]) / 4).backward()
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


# --- looped model (N_LOOPS) ---------------------------------------------------------------------------------

def randomized_pair(seed=11):
    """An N_LOOPS=1 model and an N_LOOPS=2 model with the same random shared weights; the looped one keeps its
    extra loop's initial gates (zero) and scalars (resid 1, x0 0)."""
    models = {}
    for n_loops in (1, 2):
        models[n_loops] = build(tiny_config(n_kv_head=2, n_loops=n_loops))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in models[n_loops].named_parameters():
                if "loop" not in name and "lambdas" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            n_layer = models[n_loops].config.n_layer
            models[n_loops].resid_lambdas[:n_layer] = torch.rand(n_layer, generator=g) + 0.5
            models[n_loops].x0_lambdas[:n_layer] = torch.rand(n_layer, generator=g)
    return models[1], models[2]


def test_second_loop_starts_as_the_identity():
    one, two = randomized_pair()
    idx = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        assert torch.equal(two(idx), one(idx))  # exactly: zero gates and zero x0 mix on the extra loop
        for block in two.blocks:
            block.loop_gate.weight.normal_(0, 0.1)
        assert (two(idx) - one(idx)).abs().max() > 1e-2  # opened gates do change the output


def test_init_makes_extra_loops_neutral():
    model = build(tiny_config(n_loops=3))
    assert model.resid_lambdas.shape == model.x0_lambdas.shape == (12,)
    assert torch.equal(model.resid_lambdas, torch.ones(12))
    assert torch.equal(model.x0_lambdas, torch.tensor([0.1] * 4 + [0.0] * 8))
    assert len(model.loop_embeds) == 2 and all(b.loop_gate.weight.abs().max() == 0 for b in model.blocks)
    assert build(tiny_config()).blocks[0].loop_gate is None and len(build(tiny_config()).loop_embeds) == 0


def test_gradients_reach_shared_weights_from_both_loops():
    """A shared weight's gradient is the sum over its two applications of dY^T X (captured per call)."""
    _, model = randomized_pair()
    with torch.no_grad():
        for block in model.blocks:
            block.loop_gate.weight.normal_(0, 0.1)
    linear = model.blocks[1].mlp.c_fc
    calls = []
    def capture(module, args, out):
        call = {"x": args[0].detach()}
        out.register_hook(lambda grad: call.update(dy=grad))
        calls.append(call)
    hook = linear.register_forward_hook(capture)
    idx = torch.randint(0, 96, (2, 32))
    model(idx, torch.randint(0, 96, (2, 32))).backward()
    hook.remove()
    assert len(calls) == 2
    terms = [torch.einsum("bto,bti->oi", c["dy"].double(), c["x"].double()) for c in calls]
    assert all(t.abs().max() > 1e-4 for t in terms)  # each loop contributes
    torch.testing.assert_close(linear.weight.grad.double(), terms[0] + terms[1], rtol=1e-4, atol=1e-6)


# (window pattern, loops, what the counter sees over one forward and backward of 2 x 32 tokens that the formula
# leaves out on purpose). Loop gates: 6 FLOPs per weight of 4 gates of 64 x 128, once per forward, not per token.
# S windows: the formula counts the 17 keys each query sees (what FA3 and Flex compute), the CPU's masked SDPA
# all 32: 12 FLOPs per query, key and channel (2 matmuls forward, 4 backward), 64 channels, 3 S layers.
FLOP_CASES = [("L", 1, 0), ("L", 2, 6 * 4 * 64 * 128), ("SSSL", 1, 2 * 32 * 3 * 12 * 64 * (32 - 17))]


@pytest.mark.parametrize("pattern, n_loops, unformulated", FLOP_CASES)
def test_flops_match_torch_flop_counter(pattern, n_loops, unformulated):
    """num_flops_per_token against torch's FlopCounterMode over a real forward and backward. Both count 2 FLOPs per
    multiply-add of a matmul and nothing else (embedding lookups, norms, softcap are free in both); math SDPA
    runs attention as counted matmuls (the CPU's fused kernel is invisible to the counter). Exact: the counts
    are integers."""
    model = build(tiny_config(window_pattern=pattern, n_loops=n_loops), randomize=True)
    idx = torch.randint(0, 96, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    assert counter.get_total_flops() - unformulated == 2 * 32 * model.num_flops_per_token()


@pytest.mark.parametrize("pattern, n_loops, unformulated", FLOP_CASES)
def test_cpu_budget_counts_a_steps_flops_and_leaves_no_gradients(pattern, n_loops, unformulated):
    """prepare.step_flops, what a CPU's budget counts: the forward and backward's FLOPs, equal to the hand formula
    (plus what it leaves out, as above) under the default attention kernel, whose fused CPU form the counter
    cannot see; and the model comes back with no gradients, so the training step after it starts clean."""
    model = build(tiny_config(window_pattern=pattern, n_loops=n_loops), randomize=True)
    idx = torch.randint(0, 96, (2, 32))
    assert prepare.step_flops(model, idx, idx) - unformulated == 2 * 32 * model.num_flops_per_token()
    assert all(p.grad is None for p in model.parameters())
    one_row = prepare.step_flops(model, idx[:1], idx[:1])  # train.py counts one row and multiplies
    assert 2 * one_row - prepare.step_flops(model, idx, idx) == (unformulated if n_loops > 1 else 0)
    assert train.budget_unit("cpu").startswith("work") and train.budget_unit("cuda") == "wall clock"
