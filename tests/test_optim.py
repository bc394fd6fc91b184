"""
Optimizer tests for train.py's MatrixAdamW, each against an independent reference:
- Polar Express: singular values (float64 SVD) of its output lie in a band around 1 for tall, wide and square
  inputs; the band is that of the published quintic composition on its design interval [1e-3, 1].
- Muon: a 1-matrix step equals a plain float64 reimplementation (momentum, Polar Express on the wide side,
  NorMuon with explicit per-row/per-column loops, shape factor, cautious weight decay); stacked groups equal
  single-matrix ones.
- NorMuon: second moments equalised along the kept side, Frobenius norm preserved.
- Cautious weight decay: no decay where update and parameter differ in sign.
- AdamW: torch.optim.AdamW is the oracle.

Run: uv run pytest tests/test_optim.py
"""

import math

import numpy as np
import pytest
import torch

import train
from train import MatrixAdamW, POLAR_EXPRESS_COEFFS, cautious_update_, normuon, polar_express

# Polar Express maps singular values s/||X||_F in [1e-3, 1] into this band (exact arithmetic; see
# test_quintic_composition_band), and bf16 arithmetic widens it by about 0.01 on each side
BAND_EXACT = (0.846, 1.1412)
BAND_BF16 = (0.83, 1.16)


def with_singular_values(m, n, s, g):
    """A random m x n float64 matrix with singular values s: random orthonormal factors from QR."""
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(s) @ V.T


def test_quintic_composition_band():
    s = torch.logspace(-3, 0, 5000, dtype=torch.float64)
    x = s / 1.02
    for a, b, c in POLAR_EXPRESS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    assert BAND_EXACT[0] <= x.min() and x.max() <= BAND_EXACT[1]
    assert x.min() < BAND_EXACT[0] + 0.002 and x.max() > BAND_EXACT[1] - 0.002  # the band is tight


@pytest.mark.parametrize("dtype,band", [(torch.float64, BAND_EXACT), (torch.float32, BAND_EXACT),
                                        (torch.bfloat16, BAND_BF16)])
@pytest.mark.parametrize("shape", [(192, 48), (48, 192), (96, 96), (3, 64, 32)])
def test_polar_express_singular_values_in_band(shape, dtype, band):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    if shape[-1] == shape[-2]:  # square Gaussians can be near-singular: give s/||G||_F a spread of 3e-3..0.3
        G = with_singular_values(*shape, torch.logspace(-2, 0, shape[0], dtype=torch.float64) * 7.0, g)
    out = polar_express(G, 5, dtype)
    assert out.dtype == dtype and out.shape == G.shape
    sv = torch.linalg.svdvals(out.double())
    assert band[0] <= sv.min() and sv.max() <= band[1], (sv.min().item(), sv.max().item())


@pytest.mark.parametrize("ns_steps,band", [(6, (0.99, 1.01)), (7, (0.99999, 1.00001))])
def test_polar_express_past_five_steps_polishes_toward_one(ns_steps, band):
    """NS_STEPS > 5 appends Newton-Schulz steps (15x - 10x^3 + 3x^5)/8: the band around 1 narrows each time."""
    s = torch.logspace(-3, 0, 5000, dtype=torch.float64)
    x = s / 1.02
    for a, b, c in POLAR_EXPRESS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    for _ in range(ns_steps - 5):
        x = (15 * x - 10 * x**3 + 3 * x**5) / 8
    assert band[0] <= x.min() and x.max() <= band[1]
    g = torch.Generator().manual_seed(ns_steps)
    G = with_singular_values(40, 24, torch.logspace(-2, 0, 24, dtype=torch.float64), g)
    sv = torch.linalg.svdvals(polar_express(G, ns_steps, torch.float64))
    assert band[0] <= sv.min() and sv.max() <= band[1], (sv.min().item(), sv.max().item())


def test_polar_express_keeps_singular_vectors():
    """Output ~ U f(S) V^T: with orthonormal U, V of the input, U^T out V is diagonal."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(80, 20, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.T @ polar_express(G, 5, torch.float64) @ Vh.T
    off_diagonal = core - torch.diag(torch.diag(core))
    assert off_diagonal.abs().max() < 1e-10


# --- float64 reference of one Muon step, written independently of train.py --------------------------------

def reference_polar(U):
    X = U.T if U.shape[0] > U.shape[1] else U  # always iterate on the wide side
    X = X / (1.02 * np.linalg.norm(X) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if U.shape[0] > U.shape[1] else X


def reference_normuon(O, v, beta2):
    m, n = O.shape
    out = np.empty_like(O)
    if m >= n:  # one statistic per row
        for i in range(m):
            v[i] = beta2 * v[i] + (1 - beta2) * np.mean(O[i] ** 2)
            out[i] = O[i] / math.sqrt(max(v[i], 1e-10))
    else:  # one statistic per column
        for j in range(n):
            v[j] = beta2 * v[j] + (1 - beta2) * np.mean(O[:, j] ** 2)
            out[:, j] = O[:, j] / math.sqrt(max(v[j], 1e-10))
    return out * np.linalg.norm(O) / np.linalg.norm(out)


class ReferenceMuon:
    def __init__(self, W, lr, beta2, weight_decay):
        f32 = lambda x: float(np.float32(x))  # the optimizer carries its scalars as float32 0-D tensors
        self.W, self.lr, self.beta2, self.wd = W.copy(), f32(lr), f32(beta2), f32(weight_decay)
        self.M = np.zeros_like(W)
        self.v = np.zeros(max(W.shape) if W.shape[0] != W.shape[1] else W.shape[0])

    def step(self, G, momentum):
        self.M = momentum * self.M + (1 - momentum) * G
        U = (1 - momentum) * G + momentum * self.M  # Nesterov
        O = reference_normuon(reference_polar(U), self.v, self.beta2)
        lr = self.lr * math.sqrt(max(1.0, self.W.shape[0] / self.W.shape[1]))
        decay = np.where(O * self.W >= 0, self.wd * self.W, 0.0)
        self.W = self.W - lr * O - lr * decay


def muon_optimizer(params, lr=0.04, beta2=0.95, weight_decay=0.2):
    group = dict(kind="matrix", rule="normuon", params=params, lr=lr, momentum=0.85, beta2=beta2, ns_steps=5,
                 weight_decay=weight_decay)
    return MatrixAdamW([group], dtype=torch.float64)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_muon_step_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    W = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    param = torch.nn.Parameter(W.clone())
    optimizer = muon_optimizer([param])
    reference = ReferenceMuon(W.numpy(), lr=0.04, beta2=0.95, weight_decay=0.2)
    for step, momentum in enumerate([0.85, 0.9, 0.95]):
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        param.grad = G.clone()
        optimizer.param_groups[0]["momentum"] = momentum
        optimizer.step()
        reference.step(G.numpy(), float(np.float32(momentum)))  # float32 scalars: agreement to ~1e-8, not 1e-15
        np.testing.assert_allclose(param.detach().numpy(), reference.W, rtol=1e-6, atol=1e-8, err_msg=f"step {step}")


def test_stacked_muon_group_equals_single_matrix_groups():
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(12, 20, generator=g, dtype=torch.float64) for _ in range(3)]
    stacked = [torch.nn.Parameter(w.clone()) for w in weights]
    singles = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizers = [muon_optimizer(stacked)] + [muon_optimizer([p]) for p in singles]
    for _ in range(2):
        grads = [torch.randn(12, 20, generator=g, dtype=torch.float64) for _ in range(3)]
        for params in (stacked, singles):
            for p, G in zip(params, grads):
                p.grad = G.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(stacked, singles):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- NorMuon and cautious weight decay ---------------------------------------------------------------------

@pytest.mark.parametrize("shape,kept_dim", [((64, 16), 0), ((16, 64), 1), ((32, 32), 0), ((2, 40, 10), 1)])
def test_normuon_equalises_second_moments_and_keeps_the_norm(shape, kept_dim):
    g = torch.Generator().manual_seed(2)
    O = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape[-2], 1, generator=g,
                                                                          dtype=torch.float64)
    O = O * torch.rand(1, shape[-1], generator=g, dtype=torch.float64)  # uneven rows and columns
    rows, cols = shape[-2:]
    state_shape = (*shape[:-2], rows, 1) if rows >= cols else (*shape[:-2], 1, cols)
    second_moment = torch.zeros(state_shape, dtype=torch.float64)
    out = normuon(O, second_moment, 0.95)
    reduce_dim = -1 if rows >= cols else -2
    moments = out.square().mean(dim=reduce_dim)
    assert moments.shape[-1] == shape[-2 + (1 if rows < cols else 0)]
    torch.testing.assert_close(moments, moments.mean(dim=-1, keepdim=True).expand_as(moments), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-12, atol=0)
    # the state is an EMA of the mean square along the smaller side
    O2 = torch.randn(shape, generator=g, dtype=torch.float64)
    expected = 0.95 * second_moment + 0.05 * O2.square().mean(dim=reduce_dim, keepdim=True)
    normuon(O2, second_moment, 0.95)
    torch.testing.assert_close(second_moment, expected)


def test_cautious_weight_decay_spares_opposite_signs():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(50, 40, generator=g, dtype=torch.float64)
    u = torch.randn(50, 40, generator=g, dtype=torch.float64)
    new = p.clone()
    cautious_update_(new, u, lr=0.1, weight_decay=0.5)
    opposite = (u * p) < 0
    assert 0.3 < opposite.double().mean() < 0.7
    torch.testing.assert_close(new[opposite], (p - 0.1 * u)[opposite], rtol=0, atol=1e-15)
    torch.testing.assert_close(new[~opposite], (p - 0.1 * u - 0.05 * p)[~opposite], rtol=0, atol=1e-15)


def test_muon_weight_decay_is_cautious_inside_the_optimizer():
    """Same state, weight decay off vs on: the difference is lr*wd*p exactly where the update shares p's sign."""
    g = torch.Generator().manual_seed(6)
    W, G = torch.randn(20, 12, generator=g, dtype=torch.float64), torch.randn(20, 12, generator=g, dtype=torch.float64)
    results = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(W.clone())
        p.grad = G.clone()
        muon_optimizer([p], weight_decay=wd).step()
        results[wd] = p.detach()
    lr = 0.04 * math.sqrt(20 / 12)
    update = (W - results[0.0]) / lr
    decayed = update * W >= 0
    assert 0.2 < decayed.double().mean() < 0.8
    diff = results[0.0] - results[0.5]
    torch.testing.assert_close(diff[~decayed], torch.zeros_like(diff[~decayed]), rtol=0, atol=1e-12)
    torch.testing.assert_close(diff[decayed], (lr * 0.5 * W)[decayed], rtol=1e-6, atol=1e-12)


# --- AdamW, grouping and schedules -------------------------------------------------------------------------

def tiny_config(**overrides):
    config = dict(sequence_len=32, vocab_size=96, n_layer=4, n_head=4, n_kv_head=4, n_embd=64, window_pattern="SSSL")
    return train.GPTConfig(**{**config, **overrides})


def test_adamw_matches_torch_adamw():
    g = torch.Generator().manual_seed(8)
    shapes = [(30, 10), (7,), (5, 3)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    oracle = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = [dict(kind="adamw", params=ours[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
              dict(kind="adamw", params=ours[2:], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0)]
    optimizer = MatrixAdamW(groups)
    reference = torch.optim.AdamW([dict(params=oracle[:2], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
                                   dict(params=oracle[2:], lr=0.5, betas=(0.96, 0.95), weight_decay=0.0)], eps=1e-10)
    for step in range(5):
        for a, b in zip(ours, oracle):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        if step == 3:  # a scheduled lr change reaches both
            optimizer.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 0.003
        optimizer.step()
        reference.step()
        for a, b in zip(ours, oracle):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_setup_optimizer_groups_every_parameter_once():
    model = train.GPT(tiny_config(n_embd=128, n_head=2, n_kv_head=1))
    model.init_weights(torch.float32)
    optimizer = model.setup_optimizer(dtype=torch.float32)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    muon = [group for group in optimizer.param_groups if group["kind"] == "matrix"]
    block_matrices = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    assert {id(p) for group in muon for p in group["params"]} == block_matrices
    assert all(len({p.shape for p in group["params"]}) == 1 for group in muon)
    lrs = {id(group["params"][0]): group for group in optimizer.param_groups}
    scale = (128 / 768) ** -0.5
    assert math.isclose(lrs[id(model.lm_head.weight)]["lr"], train.UNEMBEDDING_LR * scale)
    assert math.isclose(lrs[id(model.wte.weight)]["lr"], train.EMBEDDING_LR * scale)
    assert math.isclose(lrs[id(model.resid_lambdas)]["lr"], train.SCALAR_LR * 0.01)
    assert lrs[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    assert all(group["lr"] == train.MATRIX_LR and group["weight_decay"] == train.WEIGHT_DECAY for group in muon)


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = train.GPT(tiny_config())
    model.init_weights(torch.float32)
    optimizer = model.setup_optimizer(dtype=torch.float32)
    idx = torch.randint(0, 96, (4, 33))
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_schedules():
    assert train.lr_multiplier(0.0) == 1.0
    assert train.lr_multiplier(1 - train.WARMDOWN_RATIO) == 1.0
    assert math.isclose(train.lr_multiplier(1 - train.WARMDOWN_RATIO / 2), (1 + train.FINAL_LR_FRAC) / 2)
    assert math.isclose(train.lr_multiplier(1.0), train.FINAL_LR_FRAC)
    start, end, ramp = train.MATRIX_MOMENTUM_START, train.MATRIX_MOMENTUM_END, train.MATRIX_MOMENTUM_RAMP_STEPS
    assert train.matrix_momentum(0) == start
    assert math.isclose(train.matrix_momentum(ramp // 2), (start + end) / 2)
    assert train.matrix_momentum(10 * ramp) == end
    optimizer = train.GPT(tiny_config()).setup_optimizer(dtype=torch.float32)
    for progress in (0.0, 0.25, 1.0):  # weight decay falls linearly to 0 over the budget
        train.update_schedules(optimizer, 0, progress)
        assert all(math.isclose(g["weight_decay"], g["initial_weight_decay"] * (1 - progress))
                   for g in optimizer.param_groups)


def test_constant_momentum_when_the_ramp_is_zero(monkeypatch):
    monkeypatch.setattr(train, "MATRIX_MOMENTUM_RAMP_STEPS", 0)
    assert train.matrix_momentum(0) == train.matrix_momentum(1000) == train.MATRIX_MOMENTUM_END
