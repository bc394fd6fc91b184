"""
Tests of the MATRIX_OPTIMIZER variants in train.py, each against an independent float64 reimplementation written
here from the papers' update rules (plain numpy, explicit per-row/per-column loops where the rule has an axis):
- muon, adamuon, mano, newton_muon: three steps on one tall, wide or square matrix equal the reference.
- Mano alternates columns and rows, and its update has norm 0.2*sqrt(size) along the active axis;
  AdaMuon's update has RMS 0.2; Newton-Muon with identity statistics is plain Muon.
- Newton-Muon's statistics: input_second_moments equals X^T X / N of inputs captured separately, and the
  preconditioner equals the float64 inverse of the EMA plus ridge.
- Every MATRIX_OPTIMIZER value, adamw included, trains a tiny model (also a looped one): the loss falls clearly.

Run: uv run pytest tests/test_optim_variants.py
"""

import math

import numpy as np
import pytest
import torch

import train
from train import MatrixAdamW, POLAR_EXPRESS_COEFFS

SHAPES = [(24, 8), (8, 24), (16, 16)]
F32 = lambda x: float(np.float32(x))  # the optimizer carries its changing scalars as float32 0-D tensors


def reference_polar(U):
    X = U.T if U.shape[0] > U.shape[1] else U  # iterate on the wide side
    X = X / (1.02 * np.linalg.norm(X) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if U.shape[0] > U.shape[1] else X


def cautious_step(W, update, lr, wd):
    return W - lr * update - lr * np.where(update * W >= 0, wd * W, 0.0)


class Reference:
    """float64 reimplementation of one matrix rule, from the update equations (not from train.py)."""

    def __init__(self, rule, W, lr=0.04, wd=0.2):
        self.rule, self.W, self.lr, self.wd = rule, W.copy(), F32(lr), F32(wd)
        self.M, self.V, self.t = np.zeros_like(W), np.zeros_like(W), 0
        self.P = np.eye(W.shape[1])  # Newton-Muon's preconditioner

    def step(self, G, mu):
        m, n = self.W.shape
        lr = self.lr * math.sqrt(max(1.0, m / n)) if self.rule in ("muon", "newton_muon") else self.lr
        if self.rule == "mano":  # heavy ball, Nesterov look-ahead, oblique tangent projection on one axis
            self.M = mu * self.M + G
            D = G + mu * self.M
            update = np.empty_like(D)
            if self.t % 2 == 0:
                for j in range(n):
                    w, d = self.W[:, j], D[:, j]
                    t = d - (d @ w) * w
                    update[:, j] = 0.2 * math.sqrt(m) * t / (np.linalg.norm(t) + 1e-8)
            else:
                for i in range(m):
                    w, d = self.W[i], D[i]
                    t = d - (d @ w) * w
                    update[i] = 0.2 * math.sqrt(n) * t / (np.linalg.norm(t) + 1e-8)
        else:
            if self.rule == "newton_muon":
                G = G @ self.P
            self.M = mu * self.M + (1 - mu) * G
            U = (1 - mu) * G + mu * self.M
            if self.rule == "adamuon":
                O = reference_polar(np.sign(U))
                self.V = mu * self.V + (1 - mu) * O * O
                update = O / (np.sqrt(self.V) + 1e-8)
                update = update * 0.2 * math.sqrt(m * n) / (np.linalg.norm(update) + 1e-8)
            else:
                update = reference_polar(U)
        self.W = cautious_step(self.W, update, lr, self.wd)
        self.t += 1


def matrix_optimizer(params, rule, lr=0.04, weight_decay=0.2, momentum=0.85):
    group = dict(kind="matrix", rule=rule, params=params, lr=lr, momentum=momentum, beta2=0.95, ns_steps=5,
                 weight_decay=weight_decay)
    return MatrixAdamW([group], dtype=torch.float64)


@pytest.mark.parametrize("rule", ["muon", "adamuon", "mano", "newton_muon"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rule_matches_float64_reference(rule, shape):
    g = torch.Generator().manual_seed(100 * shape[0] + shape[1] + len(rule))
    W = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    param = torch.nn.Parameter(W.clone())
    optimizer = matrix_optimizer([param], rule)
    reference = Reference(rule, W.numpy())
    if rule == "newton_muon":  # a real preconditioner, from random input statistics
        X = torch.randn(64, shape[1], generator=g) * torch.linspace(0.2, 3.0, shape[1])
        train.refresh_newton_muon(optimizer, {param: X.T @ X / 64})
        reference.P = optimizer.state[param]["buffers"]["preconditioner"][0].double().numpy()
    for step, momentum in enumerate([0.85, 0.9, 0.95]):
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        param.grad = G.clone()
        optimizer.param_groups[0]["momentum"] = momentum
        optimizer.step()
        reference.step(G.numpy(), F32(momentum))
        np.testing.assert_allclose(param.detach().numpy(), reference.W, rtol=1e-6, atol=1e-8, err_msg=f"step {step}")


def test_mano_alternates_axes_with_unit_norm_times_scale():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, 12, 20, generator=g, dtype=torch.float64)
    for odd_step, dim in ((False, -2), (True, -1)):
        G = torch.randn(2, 12, 20, generator=g, dtype=torch.float64)
        update, lr_factor = train.mano_rule(G, W, torch.zeros_like(W), 0.9, odd_step=odd_step)
        assert lr_factor == 1.0
        norms = update.norm(dim=dim)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.2 * W.size(dim) ** 0.5), rtol=1e-7, atol=0)  # eps 1e-8
        other = update.norm(dim=-1 if dim == -2 else -2)
        assert other.std() > 0.01  # the other axis is not normalised: the axis really alternates


def test_mano_steps_alternate_inside_the_optimizer():
    """Two optimizer steps: the first normalises columns, the second rows (read back from the weight change)."""
    g = torch.Generator().manual_seed(4)
    param = torch.nn.Parameter(torch.randn(10, 30, generator=g, dtype=torch.float64))
    optimizer = matrix_optimizer([param], "mano", weight_decay=0.0)
    for dim in (-2, -1):
        before = param.detach().clone()
        param.grad = torch.randn(10, 30, generator=g, dtype=torch.float64)
        optimizer.step()
        norms = ((before - param.detach()) / F32(0.04)).norm(dim=dim)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.2 * param.size(dim) ** 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(3, 40, 10), (2, 10, 40)])
def test_adamuon_update_has_rms_0_2(shape):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    buffers = train.matrix_buffers("adamuon", W)
    for _ in range(3):
        update, lr_factor = train.adamuon_rule(torch.randn(shape, generator=g, dtype=torch.float64), W, **buffers,
                                               momentum=0.9, ns_steps=5, dtype=torch.float64)
        assert lr_factor == 1.0
        rms = update.square().mean(dim=(-2, -1)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.2), rtol=1e-6, atol=0)
    assert buffers["second_moment"].dtype == torch.float32


def test_adamuon_takes_the_sign_before_orthogonalising():
    """Two gradients with the same signs but different magnitudes give the same first update."""
    g = torch.Generator().manual_seed(6)
    G = torch.randn(12, 18, generator=g, dtype=torch.float64)
    updates = []
    for grad in (G, G.sign() * torch.rand(12, 18, generator=g, dtype=torch.float64).add(0.1)):
        param = torch.nn.Parameter(torch.zeros(12, 18, dtype=torch.float64))
        param.grad = grad.clone()
        matrix_optimizer([param], "adamuon", weight_decay=0.0).step()
        updates.append(param.detach())
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("refresh", [False, True])
def test_newton_muon_with_identity_statistics_is_muon(refresh):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    params = {rule: torch.nn.Parameter(W.clone()) for rule in ("muon", "newton_muon")}
    optimizers = {rule: matrix_optimizer([p], rule) for rule, p in params.items()}
    if refresh:  # identity statistics: the preconditioner becomes a multiple of I, which orthogonalisation ignores
        train.refresh_newton_muon(optimizers["newton_muon"], {params["newton_muon"]: torch.eye(24)})
        P = optimizers["newton_muon"].state[params["newton_muon"]]["buffers"]["preconditioner"][0]
        torch.testing.assert_close(P, P[0, 0] * torch.eye(24))
    for _ in range(3):
        G = torch.randn(16, 24, generator=g, dtype=torch.float64)
        for rule in params:
            params[rule].grad = G.clone()
            optimizers[rule].step()
    # steps are ~0.05; the 1e-6 in Polar Express's normalisation is what a scaled gradient changes
    torch.testing.assert_close(params["newton_muon"], params["muon"], rtol=1e-5, atol=1e-7)


def test_newton_muon_preconditioner_is_the_inverse_of_ema_plus_ridge():
    g = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(6, 12, generator=g)) for _ in range(2)]
    optimizer = matrix_optimizer(params, "newton_muon")
    K = [1e-3 * np.eye(12) for _ in params]
    for _ in range(3):
        moments = {}
        for i, p in enumerate(params):
            X = torch.randn(50, 12, generator=g) * torch.rand(12, generator=g).add(0.1)
            moments[p] = X.T @ X / 50
            K[i] = 0.8 * K[i] + 0.2 * moments[p].double().numpy()
        train.refresh_newton_muon(optimizer, moments)
    P = optimizer.state[params[0]]["buffers"]["preconditioner"]
    assert P.dtype == torch.float32
    for i in range(2):
        expected = np.linalg.inv(K[i] + (0.2 * np.trace(K[i]) / 12 + 1e-8) * np.eye(12))
        np.testing.assert_allclose(P[i].double().numpy(), expected, rtol=2e-4, atol=1e-5)


def test_newton_muon_falls_back_to_identity_when_cholesky_fails():
    param = torch.nn.Parameter(torch.randn(4, 6))
    optimizer = matrix_optimizer([param], "newton_muon")
    train.refresh_newton_muon(optimizer, {param: -100 * torch.eye(6)})  # negative definite: no Cholesky factor
    torch.testing.assert_close(optimizer.state[param]["buffers"]["preconditioner"][0], torch.eye(6))


def test_input_second_moments_match_captured_inputs():
    """Every block matrix gets X^T X / N of its own input, averaged over the loops that apply it."""
    torch.manual_seed(0)
    model = train.LoopedGPT(tiny_config(n_loops=2))
    model.init_weights(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    idx = torch.randint(0, 96, (2, 32))
    captured = {}
    hooks = [module.register_forward_hook(lambda m, args, out: captured.setdefault(m.weight, []).append(args[0]))
             for module in model.blocks.modules() if isinstance(module, torch.nn.Linear)]
    model(idx)
    for h in hooks:
        h.remove()
    moments = train.input_second_moments(model, idx)
    assert set(moments) == {p for p in model.blocks.parameters() if p.ndim == 2}
    for weight, inputs in captured.items():
        X = [x.reshape(-1, x.size(-1)).double() for x in inputs]
        expected = sum(x.T @ x / len(x) for x in X) / len(X)
        torch.testing.assert_close(moments[weight].double(), expected, rtol=1e-4, atol=1e-5)
    assert len(captured[model.blocks[0].mlp.c_fc.weight]) == 2  # both loops were seen


def test_statistics_stay_float32_under_bf16_autocast():
    """train.py gathers Newton-Muon's statistics inside the bf16 autocast of CUDA (and of bf16-fast CPUs)."""
    model = train.GPT(tiny_config())
    model.init_weights(torch.bfloat16)
    idx = torch.randint(0, 96, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moments = train.input_second_moments(model, idx)
    assert all(m.dtype == torch.float32 for m in moments.values())
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    optimizer = matrix_optimizer([matrices[0]], "newton_muon")
    train.refresh_newton_muon(optimizer, moments)
    assert torch.isfinite(optimizer.state[matrices[0]]["buffers"]["preconditioner"]).all()


# --- every variant trains ---------------------------------------------------------------------------------

def tiny_config(**overrides):
    config = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    return train.GPTConfig(**{**config, **overrides})


@pytest.mark.parametrize("n_loops", [1, 2])
@pytest.mark.parametrize("rule,lr", [("normuon", 0.04), ("muon", 0.04), ("adamuon", 0.02), ("mano", 0.02),
                                     ("newton_muon", 0.04), ("adamw", 0.003)])
def test_every_matrix_optimizer_trains_a_tiny_model(monkeypatch, rule, lr, n_loops):
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", rule)
    monkeypatch.setattr(train, "MATRIX_LR", lr)
    torch.manual_seed(0)
    model = (train.LoopedGPT if n_loops > 1 else train.GPT)(tiny_config(n_loops=n_loops))
    model.init_weights(torch.float32)
    optimizer = model.setup_optimizer(dtype=torch.float32)
    data = torch.randint(0, 96, (8, 33))
    losses = []
    for step in range(30):
        x, y = data[:, :-1], data[:, 1:]
        loss = model(x, y)
        loss.backward()
        if rule == "newton_muon" and (step + 1) % 8 == 0:
            train.refresh_newton_muon(optimizer, train.input_second_moments(model, x))
        train.update_schedules(optimizer, step, progress=0.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_unknown_matrix_optimizer_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", "lion")
    model = train.GPT(tiny_config())
    with pytest.raises(SystemExit, match="MATRIX_OPTIMIZER = 'lion': use one of normuon, muon"):
        model.setup_optimizer()


def test_adamw_matrices_are_one_adamw_group(monkeypatch):
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", "adamw")
    model = train.GPT(tiny_config())
    optimizer = model.setup_optimizer()
    assert all(group["kind"] == "adamw" for group in optimizer.param_groups)
    matrices = {p for p in model.blocks.parameters() if p.ndim == 2}
    group = next(g for g in optimizer.param_groups if matrices & set(g["params"]))
    assert set(group["params"]) == matrices
    assert group["lr"] == train.MATRIX_LR and group["weight_decay"] == train.WEIGHT_DECAY


@pytest.mark.parametrize("n_loops", [1, 2])
@pytest.mark.parametrize("rule", ["normuon", "muon", "adamuon", "mano", "newton_muon", "adamw"])
def test_compiled_optimizer_stays_within_dynamo_limits(monkeypatch, rule, n_loops):
    """On CUDA both optimizer steps compile with fullgraph=True: every new shape, dtype or flag is another graph,
    and past dynamo's recompile limit step 0 raises. Compiled here with backend="eager" (the same tracing and
    guards, no code generation), bf16 embeddings as on a GPU; the steps must equal the uncompiled ones."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real_compile(f, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", rule)
    torch._dynamo.reset()
    finals = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = (train.LoopedGPT if n_loops > 1 else train.GPT)(tiny_config(n_loops=n_loops, n_layer=3))
        model.init_weights(torch.bfloat16)
        optimizer = model.setup_optimizer(dtype=torch.float32, compile=compile)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            train.update_schedules(optimizer, step, step / 4)
            optimizer.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*finals):
        torch.testing.assert_close(compiled, eager)
