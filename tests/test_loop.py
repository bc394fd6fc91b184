"""
Looped models in train.py (N_LOOPS > 1): LOOP_CONDITIONING "gates" (the default) and "loopformer", and
LOOP_ROUTING "mor" (Mixture-of-Recursions with a causal router). Each is checked against an independent
computation: the gates model against its loop written out here and its initial draws made here; LoopFormer at init
against the residual stream computed by hand with every block left out; MoR at capacity 1 against the plain looped
model with the same weights (float64); the tokens a router takes against a selection computed here with Python
loops, untaken tokens bit for bit; causality by changing later tokens, in train() and eval() mode; Newton-Muon's
statistics against X^T X / N over the taken tokens' captured inputs; FLOPs against a hand count and torch's
FlopCounterMode. Every MATRIX_OPTIMIZER trains a routed model.

Run: uv run pytest tests/test_loop.py
"""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from train import GPTConfig, LoopedGPT, norm

V, C, T = 96, 64, 32


def tiny_config(**overrides):
    config = dict(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=C, window_pattern="SL",
                  n_loops=2)
    return GPTConfig(**{**config, **overrides})


def build(config, randomize=(), seed=0, dtype=torch.float32):
    """A model initialised as train.py does (on the meta device first); parameters whose name contains one of
    `randomize` are then drawn from N(0, 0.5) so that their path carries signal."""
    with torch.device("meta"):
        model = LoopedGPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in randomize):
                p.normal_(0, 0.5)
    return model.to(dtype)


EVERYTHING = ("",)  # a name part every parameter has
ALL_BUT_LOOP_GATES = ("wte", "lm_head", "attn.c", "ve_gate", "mlp", "lambdas", "value_embeds", "time_embeds",
                      "routers")


def tokens(seed, rows=2, length=T):
    return torch.randint(0, V, (rows, length), generator=torch.Generator().manual_seed(seed))


def softcapped_head(model, x):
    logits = model.lm_head(norm(x)).float()
    return train.SOFTCAP * torch.tanh(logits / train.SOFTCAP)


# --- gates: the default, unchanged ---------------------------------------------------------------------------

def gates_reference(model, idx):
    """The looped model as train.py computed it before LOOP_CONDITIONING existed: the first loop ungated, loop l
    gated per channel by loop_gate(norm(loop_embeds[l - 1])), two halves for attention and MLP."""
    config = model.config
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    x = x0 = norm(model.wte(idx))
    for loop in range(config.n_loops):
        for i, block in enumerate(model.blocks):
            j = loop * config.n_layer + i
            x = model.resid_lambdas[j] * x + model.x0_lambdas[j] * x0
            ve = model.value_embeds[str(i)](idx) if str(i) in model.value_embeds else None
            gates = (1.0, 1.0) if loop == 0 else block.loop_gate(norm(model.loop_embeds[loop - 1])).chunk(2)
            x = x + gates[0] * block.attn(norm(x), ve, cos, sin, model.window_sizes[i])
            x = x + gates[1] * block.mlp(norm(x))
    return softcapped_head(model, x)


def test_gates_model_computes_what_it_did_bit_for_bit():
    model = build(tiny_config(n_loops=3), randomize=EVERYTHING, seed=1)
    idx = tokens(0)
    with torch.no_grad():
        assert torch.equal(model(idx), gates_reference(model, idx))
    assert not any("time_embeds" in name or "routers" in name for name, _ in model.named_parameters())


def test_gates_model_draws_todays_initial_weights():
    """The draws of init_weights, made here in their order: wte, lm_head, per block c_q, c_k, c_v, c_fc, then
    the value embeddings and the loop embeddings; projections and gates zero. A routed model draws the same."""
    bound = (3 / C) ** 0.5
    torch.manual_seed(0)
    expected = {"wte.weight": torch.empty(V, C).normal_(), "lm_head.weight": torch.empty(V, C).normal_(std=0.001)}
    for i in range(2):
        for name, rows in (("attn.c_q", C), ("attn.c_k", C // 2), ("attn.c_v", C // 2), ("mlp.c_fc", 4 * C)):
            expected[f"blocks.{i}.{name}.weight"] = torch.empty(rows, C).uniform_(-bound, bound)
    expected["value_embeds.1.weight"] = torch.empty(V, C // 2).uniform_(-bound, bound)
    expected["loop_embeds.0"] = torch.empty(C).normal_()
    for config in (tiny_config(), tiny_config(loop_routing="mor")):
        params = dict(build(config).named_parameters())
        for name, value in expected.items():
            assert torch.equal(params[name], value), name
        for name in ("attn.c_proj", "mlp.c_proj", "attn.ve_gate", "loop_gate"):
            assert params[f"blocks.1.{name}.weight"].abs().max() == 0, name


# --- loopformer ----------------------------------------------------------------------------------------------

def test_loopformer_blocks_start_as_the_identity():
    """Zero modulation: every block adds nothing on every loop, whatever the other weights. The output is the
    embedding stream mixed by the per-layer scalars alone, computed here."""
    config = tiny_config(loop_conditioning="loopformer", n_loops=3)
    model = build(config, randomize=ALL_BUT_LOOP_GATES, seed=2)
    idx = tokens(1)
    with torch.no_grad():
        x = x0 = norm(model.wte(idx))
        for j in range(config.n_layer * config.n_loops):
            x = model.resid_lambdas[j] * x + model.x0_lambdas[j] * x0
        assert torch.equal(model(idx), softcapped_head(model, x))
        model.blocks[0].loop_gate.bias[3 * C:] = 0.5  # a scale alone (the gates still 0) changes nothing either
        assert torch.equal(model(idx), softcapped_head(model, x))
        model.blocks[0].loop_gate.bias[:C] = 0.5  # an open attention gate does
        assert (model(idx) - softcapped_head(model, x)).abs().max() > 1e-3


def test_loopformer_condition_is_the_embedded_time_and_step():
    """Per loop, SiLU(TimeEmb(t) + DtEmb(dt)) with t = loop / N_LOOPS and dt = 1 / N_LOOPS: DiT's features (cos,
    then sin, of t times 10000^(-i / half)) and both MLPs (Linear, SiLU, Linear) written out here in float64."""
    n, half = 3, train.TIME_FEATURES // 2
    model = build(tiny_config(loop_conditioning="loopformer", n_loops=n), randomize=("time_embeds",), seed=6)

    def embed(mlp, value):
        angles = [value * 10000 ** (-i / half) for i in range(half)]
        features = torch.tensor([math.cos(a) for a in angles] + [math.sin(a) for a in angles], dtype=torch.float64)
        hidden = mlp[0].weight.double() @ features + mlp[0].bias.double()
        return mlp[2].weight.double() @ (hidden * torch.sigmoid(hidden)) + mlp[2].bias.double()

    conditions = model.loop_conditions()
    assert len(conditions) == n
    for loop, condition in enumerate(conditions):
        c = embed(model.time_embeds[0], loop / n) + embed(model.time_embeds[1], 1 / n)
        torch.testing.assert_close(condition.double(), c * torch.sigmoid(c), rtol=1e-5, atol=1e-5)


def test_loopformer_gates_get_gradients_at_init_and_training_lowers_the_loss():
    """No dead saddle: the gate rows of every modulation get a gradient from the first backward (the projections
    they gate are not zero); the scale rows, zero while the gates are, get theirs after the first step."""
    model = build(tiny_config(loop_conditioning="loopformer", n_loops=2), seed=3)
    optimizer = model.setup_optimizer(dtype=torch.float32)
    data = tokens(2, rows=8, length=T + 1)
    losses = []
    for step in range(12):
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        for block in model.blocks:
            for grad in (block.loop_gate.weight.grad, block.loop_gate.bias.grad):
                assert grad[:2 * C].abs().max() > 0
                assert (grad[2 * C:].abs().max() > 0) == (step > 0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- MoR: routing ---------------------------------------------------------------------------------------------

def mor_config(capacity, **overrides):
    return tiny_config(n_loops=len(capacity), loop_routing="mor", mor_capacity=capacity, **overrides)


def router_inputs(model):
    """Forward pre-hooks recording each router's input: the hidden state before its loop."""
    seen = []
    hooks = [router.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
             for router in model.routers]
    return seen, hooks


def selection(x, weight, selected, capacity):
    """The tokens a router takes, one at a time in position order: its logit norm(x) . weight >= 0, taken by the
    loop before, and fewer than ceil(capacity * T) taken before it in its sequence."""
    logits = norm(x.double()) @ weight.double()
    taken = torch.zeros_like(selected)
    for b in range(x.size(0)):
        count = 0
        for t in range(x.size(1)):
            if logits[b, t] >= 0 and selected[b, t] and count < math.ceil(capacity * x.size(1)):
                taken[b, t], count = True, count + 1
    return taken, (logits >= 0) & selected


def test_capacity_one_everywhere_is_the_plain_looped_model():
    """Routers that take every token (zero weights: logit 0) at capacity 1: the routed path (gather, masked SDPA
    with the windows, scatter, straight-through factor) gives the plain looped model's logits and per-token
    losses; the mean loss adds the capacity term, MOR_AUX_WEIGHT * sum over loops of (0.5 - 1)^2."""
    routed = build(mor_config((1.0, 1.0, 1.0)), randomize=EVERYTHING, seed=4, dtype=torch.float64)
    with torch.no_grad():
        for router in routed.routers:
            router.weight.zero_()
    plain = build(tiny_config(n_loops=3), dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in routed.state_dict().items() if "routers" not in k})
    idx, targets = tokens(3), tokens(4)
    seen, hooks = router_inputs(routed)
    with torch.no_grad():
        torch.testing.assert_close(routed(idx), plain(idx), rtol=0, atol=1e-12)
        per_token = routed(idx, targets, reduction="none")
        torch.testing.assert_close(per_token, plain(idx, targets, reduction="none"), rtol=0, atol=1e-12)
        torch.testing.assert_close(routed(idx, targets), per_token.mean() + train.MOR_AUX_WEIGHT * 2 * 0.25)
    assert len(seen) == 3 * 2  # both routers ran in each of the three forwards
    for hook in hooks:
        hook.remove()


def test_untaken_tokens_pass_a_routed_loop_bit_for_bit():
    """Over loops 1 and 2 (between the inputs of consecutive routers), exactly the tokens that the selection
    computed here takes change; every other token's hidden state is bit-identical. Loop 1 (capacity 1) runs the
    tokens its router declines as padding slots; loop 2 (capacity 1/8: 4 rows) hits its cap and filters by loop 1."""
    capacity = (1.0, 1.0, 0.125, 0.125)
    model = build(mor_config(capacity), randomize=EVERYTHING, seed=5, dtype=torch.float64)
    seen, hooks = router_inputs(model)
    with torch.no_grad():
        model(tokens(6, rows=4))
    for hook in hooks:
        hook.remove()
    taken = torch.ones(4, T, dtype=torch.bool)
    for loop in (1, 2):
        before, after = seen[loop - 1], seen[loop]
        previous = taken
        taken, wanted = selection(before, model.routers[loop - 1].weight, previous, capacity[loop])
        assert torch.equal((after != before).any(-1), taken), loop
        assert torch.equal(after[~taken], before[~taken]), loop
    assert (norm(seen[0]) @ model.routers[0].weight < 0).any()  # loop 1 declines tokens: its padding slots
    assert (wanted.sum(1) > 4).any()  # loop 2's cap binds
    assert (wanted != (norm(seen[1]) @ model.routers[1].weight >= 0)).any()  # loop 1's choice filters loop 2's


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_routed_model_is_causal(mode):
    """Changing tokens after position t never changes the logits or per-token losses at or before t, in train()
    and eval() mode alike; one sequence gives what it gives inside a batch."""
    model = build(mor_config((1.0, 0.5, 0.25)), randomize=EVERYTHING, seed=7, dtype=torch.float64)
    getattr(model, mode)()
    idx, targets = tokens(8), tokens(9)
    with torch.no_grad():
        logits, losses = model(idx), model(idx, targets, reduction="none").view(2, T)
        torch.testing.assert_close(model(idx[1:]), logits[1:], rtol=0, atol=1e-12)
        for t in (0, 9, 20, T - 2):
            changed, changed_targets = idx.clone(), targets.clone()
            changed[:, t + 1:] = tokens(10 + t, length=T - t - 1)
            changed_targets[:, t + 1:] = tokens(50 + t, length=T - t - 1)
            after = model(changed)
            torch.testing.assert_close(after[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-12)
            after_losses = model(changed, changed_targets, reduction="none").view(2, T)
            torch.testing.assert_close(after_losses[:, :t + 1], losses[:, :t + 1], rtol=0, atol=1e-12)
            assert (after[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("rule,lr", [("normuon", 0.04), ("muon", 0.04), ("adamuon", 0.02), ("mano", 0.02),
                                     ("newton_muon", 0.04), ("adamw", 0.003)])
def test_every_matrix_optimizer_trains_a_routed_model(monkeypatch, rule, lr):
    """The loss falls, and the routers (zero at first) learn through the straight-through factor: at capacity
    0.5 their capacity term has no gradient at init (mean probability 0.5)."""
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", rule)
    monkeypatch.setattr(train, "MATRIX_LR", lr)
    model = build(mor_config((1.0, 0.5)), seed=8)
    optimizer = model.setup_optimizer(dtype=torch.float32)
    data = tokens(11, rows=8, length=T + 1)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for step in range(20):
        loss = model(x, y)
        loss.backward()
        if rule == "newton_muon" and (step + 1) % 8 == 0:
            train.refresh_newton_muon(optimizer, train.input_second_moments(model, x))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < 0.7 * losses[0], losses[::4]
    assert model.routers[0].weight.abs().max() > 1e-3


def test_newton_statistics_count_only_the_taken_rows():
    """input_second_moments against X^T X / N from inputs captured here: all tokens on loop 0; on the routed loop
    only the rows of tokens the selection computed here takes (the gathered rows start with them, in position
    order), not the padding rows that run alongside (tokens the router declines, capacity 1 here)."""
    model = build(mor_config((1.0, 1.0)), randomize=EVERYTHING, seed=9)
    idx = tokens(12, rows=3)
    captured = {}
    linears = (model.blocks[0].mlp.c_fc, model.blocks[1].attn.c_q, model.blocks[1].attn.c_proj)
    hooks = [linear.register_forward_hook(lambda m, args, out: captured.setdefault(m, []).append(args[0]))
             for linear in linears]
    seen, router_hooks = router_inputs(model)
    with torch.no_grad():
        model(idx)
    for hook in hooks + router_hooks:
        hook.remove()
    taken, _ = selection(seen[0], model.routers[0].weight, torch.ones(3, T, dtype=torch.bool), 1.0)
    assert (taken.sum(1) < T).all() and taken.any(1).all()  # every sequence has taken rows and padding rows
    moments = train.input_second_moments(model, idx)
    assert set(moments) == {m.weight for m in model.matrix_layers()}
    for linear in linears:
        every, gathered = (x.double() for x in captured[linear])
        X0 = every.reshape(-1, every.size(-1))
        X1 = torch.cat([gathered[b, :n] for b, n in enumerate(taken.sum(1).tolist())])
        expected = (X0.T @ X0 / len(X0) + X1.T @ X1 / len(X1)) / 2
        torch.testing.assert_close(moments[linear.weight].double(), expected, rtol=1e-4, atol=1e-6)


# --- MoR: FLOPs, constants -----------------------------------------------------------------------------------

def test_routed_flops_count_what_runs():
    """num_flops_per_token by hand for 2 layers of width 64 (2 heads of 32, 1 kv head), context 32, vocab 96,
    3 loops at capacity (1, 0.5, 0.25): k = 16 and 8 rows. Then against torch's FlopCounterMode over a forward
    and backward, which also sees the loop gates (per forward, not per token: left out of the formula) and misses
    the routers' matrix-vector products (aten.mv is not in its table)."""
    model = build(mor_config((1.0, 0.5, 0.25), window_pattern="L"), randomize=EVERYTHING, seed=10)
    per_layer = C * C + 2 * C * (C // 2) + C * C + 2 * 4 * C * C  # c_q, c_k and c_v, attention's c_proj, the MLP
    block_weights = 2 * per_layer + 32 * 1  # the last layer's value-embedding gate: 32 channels to 1 kv head
    attention_per_key = 12 * C  # 2 heads of 32 channels: 2 matmuls forward, 4 backward
    first = 6 * block_weights + 2 * attention_per_key * T
    routed = [6 * C + k / T * (6 * block_weights + 2 * attention_per_key * k) for k in (16, 8)]
    expected = 6 * V * C + first + sum(routed)
    assert model.num_flops_per_token() == pytest.approx(expected, rel=1e-12)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens(13), tokens(14)).backward()
    loop_gates, routers = 6 * 2 * 2 * C * 2 * C, 2 * 6 * C  # 2 layers x 2 gated loops of a 64 x 128 gate
    assert counter.get_total_flops() - loop_gates == pytest.approx(2 * T * (expected - routers), rel=1e-12)


@pytest.mark.parametrize("capacity", [(1.0,), (1.0, 0.5, 0.5), (0.5, 0.5), (1.0, 0.0), (1.0, 1.5), 0.5])
def test_bad_capacity_is_one_line_naming_the_constant(capacity):
    with pytest.raises(SystemExit, match=r"MOR_CAPACITY = .*N_LOOPS = 2 fractions in \(0, 1\], the first 1.0"):
        LoopedGPT(tiny_config(loop_routing="mor", mor_capacity=capacity))


def test_unknown_loop_options_name_the_constants():
    with pytest.raises(SystemExit, match="LOOP_CONDITIONING = 'adaln'.*use gates or loopformer"):
        LoopedGPT(tiny_config(loop_conditioning="adaln"))
    with pytest.raises(SystemExit, match="LOOP_ROUTING = 'topk'.*none or mor"):
        LoopedGPT(tiny_config(loop_routing="topk"))


def test_model_config_carries_the_loop_constants(monkeypatch):
    for name, value in (("N_LOOPS", 3), ("LOOP_CONDITIONING", "loopformer"), ("LOOP_ROUTING", "mor"),
                        ("MOR_CAPACITY", (1.0, 0.5, 0.25))):
        monkeypatch.setattr(train, name, value)
    config = train.model_config(V)
    assert (config.n_loops, config.loop_conditioning, config.loop_routing, config.mor_capacity) == \
        (3, "loopformer", "mor", (1.0, 0.5, 0.25))
