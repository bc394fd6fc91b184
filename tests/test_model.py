"""
Model tests for train.py: shapes and finite loss, causality, sliding windows, value embeddings, initialisation,
the looped model's shared weights, and the FLOP formula against torch's counter. Each attention backend wired into
the whole model is checked against the same model with a naive float64 attention (the backends alone:
tests/test_runtime.py).

Run: uv run pytest tests/test_model.py
"""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import prepare
import runtime
import train
from conftest import naive_attention
from train import GPT, GPTConfig, LoopedGPT, has_ve, layer_windows


def tiny_config(**overrides):
    config = dict(sequence_len=32, vocab_size=96, n_layer=4, n_head=4, n_kv_head=4, n_embd=64, window_pattern="SSSL")
    return GPTConfig(**{**config, **overrides})


def build(config, dtype=torch.float32, randomize=False, seed=0, attend=runtime.attention_sdpa):
    """A model on the CPU, as train.py picks its class; randomize=True replaces the zero/near-zero init so every
    path carries signal."""
    torch.manual_seed(seed)
    model = (LoopedGPT if config.n_loops > 1 else GPT)(config, attend)
    model.init_weights(dtype)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
    return model


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
    config = tiny_config(n_kv_head=2)
    attend = runtime.Runtime("", "cpu", torch.float32, backend, False, False).attention(32, layer_windows(config))
    model = build(config, randomize=True, seed=3, attend=attend)
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
    monkeypatch.setattr(train, "DEPTH", 3)
    monkeypatch.setattr(train, "ASPECT_RATIO", 64)
    monkeypatch.setattr(train, "HEAD_DIM", 128)
    config = train.model_config(8192)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (256, 2, 2)
    assert config.sequence_len == train.MAX_SEQ_LEN and config.window_pattern == train.WINDOW_PATTERN


def test_norm_keeps_its_input_dtype_when_rms_norm_upcasts(monkeypatch):
    """CUDA autocast runs rms_norm in fp32 (torch >= 2.12). Simulated here: q, k and v must still reach
    attention in one dtype, and the residual stream must stay in the embeddings' dtype."""
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda x, shape, *a, **k: real(x.float(), shape))
    seen = []
    def recording(q, k, v, window):
        seen.append((q.dtype, k.dtype, v.dtype))
        return runtime.attention_sdpa(q, k, v, window)
    model = build(tiny_config(), dtype=torch.bfloat16, attend=recording)
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
    plain = build(tiny_config())  # N_LOOPS = 1: the plain GPT, with no loop parameter at all
    assert type(plain) is GPT and not any("loop" in name for name, _ in plain.named_parameters())


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
    one_row = prepare.step_flops(model, idx[:1], idx[:1])  # runtime.Budget counts one row and multiplies
    assert 2 * one_row - prepare.step_flops(model, idx, idx) == (unformulated if n_loops > 1 else 0)
