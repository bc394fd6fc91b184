"""
CUDA-only checks of train.py's GPU path, each against an independent computation; on a machine without CUDA every
test skips with the reason. bench/device_check.sh runs them on a lent GPU.

- evaluate_bpb of the compiled model under bf16 autocast against fp32 eager on the same weights;
- FlexAttention, SDPA and FlashAttention-3 (when it loads) against a float64 naive attention, outputs and
  gradients, for every window of the SSSL pattern at the profile's context;
- the whole GPT under bf16 autocast: q, k and v reach attention in one dtype and the residual stream stays bf16;
- gradient accumulation over micro-batches of 32 rows against one batch of 128;
- the compiled model and optimizer steps do not recompile after step 1.

Run: uv run pytest tests/test_cuda.py        (bash bench/device_check.sh runs them with the rest of the GPU check)
"""

import pytest
import torch

import prepare
import runtime
import train
from conftest import naive_attention, random_qkv
from test_model import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_attention(backend, config):
    """The backend's attend(q, k, v, window) for config's windows, as runtime.Runtime.attention builds it; skips
    when FlashAttention-3 does not load (a broken loader is caught by test_runtime's fake-kernels tests)."""
    fa3 = None
    if backend == "fa3":
        fa3, why = runtime.load_fa3()
        if fa3 is None:
            pytest.skip(f"FlashAttention-3 unavailable: {why}")
    rt = runtime.Runtime("", "cuda", torch.bfloat16, backend, True, True, fa3=fa3)
    return rt.attention(config.sequence_len, train.layer_windows(config))


def cuda_model(config, attend=runtime.attention_sdpa, seed=0):
    """A model on the GPU with random weights everywhere (zero-initialised projections would hide errors)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = train.GPT(config, attend)
    model.to_empty(device="cuda")
    model.init_weights(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.1)
    return model


def test_compiled_bf16_evaluation_matches_fp32_eager(monkeypatch):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); a depth-2 model's per-token loss then moves
    by well under 1%, and the sum over hundreds of thousands of tokens averages the rounding out, so the two
    val_bpb must agree within 1% of their value, while a wrong mask or scale moves it by far more."""
    try:
        tokenizer = prepare.Tokenizer.from_directory()
    except SystemExit as e:
        pytest.skip(f"no prepared dataset: {e}")
    monkeypatch.setattr(train, "DEPTH", 2)
    config = train.model_config(tokenizer.get_vocab_size())
    model = cuda_model(config, cuda_attention("flex", config))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = prepare.evaluate_bpb(torch.compile(model, dynamic=False), tokenizer, 16)
    model.float()  # embeddings too: the same weights, all in fp32
    for block in model.blocks:  # eager SDPA: no compilation and no Flex anywhere on the fp32 side
        block.attn.attend = runtime.attention_sdpa
    fp32 = prepare.evaluate_bpb(model, tokenizer, 16)
    assert abs(bf16 - fp32) < 0.01 * fp32, (bf16, fp32)


def windows_of_sssl():
    return sorted(set(train.layer_windows(tiny_config(sequence_len=prepare.MAX_SEQ_LEN, window_pattern="SSSL"))))


@pytest.mark.parametrize("backend", ["flex", "sdpa", "fa3"])
@pytest.mark.parametrize("window", windows_of_sssl())
def test_backends_match_naive_on_every_sssl_window(backend, window):
    T = prepare.MAX_SEQ_LEN
    attend = cuda_attention(backend, tiny_config(sequence_len=T, window_pattern="SSSL"))
    q, k, v = (t.requires_grad_() for t in random_qkv(B=1, T=T, H=4, Hkv=4, D=128, device="cuda",
                                                      dtype=torch.bfloat16))
    y = attend(q, k, v, window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    y_ref = naive_attention(q64, k64, v64, window)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(y_ref)
    (y.double() * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["flex", "sdpa", "fa3"])
def test_bf16_autocast_keeps_qkv_and_residual_in_one_dtype(backend):
    config = tiny_config(sequence_len=256, vocab_size=512, n_embd=256, n_head=2, n_kv_head=2)
    attend, seen = cuda_attention(backend, config), []
    def recording(q, k, v, window):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(q, k, v, window)
    model = cuda_model(config, recording)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(args[0].dtype))
    idx = torch.randint(0, 512, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(idx, idx).backward()
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
    assert head_inputs == [torch.bfloat16]


def test_accumulated_micro_batches_give_the_batch_gradient():
    """32-row micro-batches averaged over 4 steps, as train.py accumulates them, against one 128-row batch."""
    model = cuda_model(tiny_config(sequence_len=128, vocab_size=512, n_embd=128, n_head=2, n_kv_head=2))
    idx = torch.randint(0, 512, (128, 129), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, y).backward()
    whole = [p.grad.float().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for i in range(0, 128, 32):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (model(x[i:i + 32], y[i:i + 32]) / 4).backward()
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad.float(), g, atol=1e-3, rtol=2e-2)


def test_no_recompilation_after_step_one():
    """The schedules change lr, momentum and weight decay every step: as 0-D tensors they must not recompile."""
    from torch._dynamo.utils import counters
    config = tiny_config(sequence_len=256, vocab_size=512, n_embd=128, n_head=2, n_kv_head=2)
    model = cuda_model(config, cuda_attention("flex", config))
    optimizer = model.setup_optimizer(dtype=torch.bfloat16, compile=True)
    step_model = torch.compile(model, dynamic=False)
    idx = torch.randint(0, 512, (4, 257), device="cuda")
    graphs = []
    for step in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step_model(idx[:, :-1], idx[:, 1:]).backward()
        train.update_schedules(optimizer, step, step / 6)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], f"graphs compiled after each step: {graphs}"
