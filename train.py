"""
Pretrain a small GPT for a fixed time budget and report val_bpb (validation bits per byte, lower is better).
Single file, single device: CUDA, Apple MPS or CPU. The agent edits this file: the hyperparameters are plain
constants right below the imports; device, precision and attention path are each decided by one small function
and printed at start-up with the reason.

Usage: uv run train.py          (after `uv run prepare.py`, or `uv run prepare.py --dataset stdlib` offline)
"""

import gc
import math
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from urllib.parse import urlparse

# OpenMP threads waiting at a barrier spin 1,000 rounds before sleeping, not libgomp's default 300,000: 2% slower
# on a quiet CPU, but a busy neighbour no longer costs 41% more CPU time per step (bench/noise.py --load)
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # read when torch loads libgomp

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import (CPU_FLOPS, MAX_SEQ_LEN, PROFILE, PROFILE_REASON, TIME_BUDGET, Tokenizer, dataset_label,
                     evaluate_bpb, make_dataloader, step_flops)

# ---------------------------------------------------------------------------
# Hyperparameters: edit these directly (no CLI flags)
# ---------------------------------------------------------------------------

# Optimization
EMBEDDING_LR = 0.6            # AdamW lr of token and value embeddings, times (model_dim/768)^-0.5
UNEMBEDDING_LR = 0.004        # AdamW lr of lm_head, times (model_dim/768)^-0.5
SCALAR_LR = 0.5               # AdamW lr of x0_lambdas; resid_lambdas get 0.01 of it
ADAM_BETAS = (0.8, 0.95)      # AdamW betas (x0_lambdas use (0.96, 0.95))
MATRIX_OPTIMIZER = "normuon"  # block matrices: normuon, muon, adamuon, mano, newton_muon or adamw
MATRIX_LR = 0.04              # lr of every matrix inside the blocks, whichever MATRIX_OPTIMIZER steps them
MUON_MOMENTUM_START = 0.85    # momentum of the matrix optimizer, ramped linearly from START...
MUON_MOMENTUM_END = 0.95      # ...to END...
MUON_MOMENTUM_RAMP_STEPS = 300  # ...over this many steps
NORMUON_BETA2 = 0.95          # EMA of NorMuon's second moment
NS_STEPS = 5                  # Polar Express iterations; beyond 5, Newton-Schulz polishing steps
WEIGHT_DECAY = 0.2            # weight decay of the block matrices (cautious, except adamw), decayed linearly to 0
WARMUP_RATIO = 0.0            # share of the budget spent warming the lr up
WARMDOWN_RATIO = 0.5          # share of the budget at the end spent decaying the lr linearly...
FINAL_LR_FRAC = 0.0           # ...to this fraction of its peak
SEED = 42

# Architecture (size and batch follow, per device)
N_LOOPS = 1                   # the stack of blocks runs this many times with shared weights (a looped transformer)
LOOP_CONDITIONING = "gates"   # gates: per-channel gates of each extra loop; loopformer: LoopFormer's time conditioning
LOOP_ROUTING = "none"         # none, or mor: each loop after the first runs only on the tokens a causal router takes
MOR_CAPACITY = (1.0, 0.5)     # mor: most tokens each loop may take, a fraction per loop (the first always 1.0)
MOR_AUX_WEIGHT = 0.1          # mor: weight of (mean router probability - capacity)^2, MoR's token-choice balancing's

# Size and batch, the one per-platform choice (prepare.py picks the profile). gpu: the reference baseline, so an
# H100 run compares with its published val_bpb 0.9979; DEVICE_BATCH_SIZE shrinks to what fits a smaller card.
# cpu-bf16 (a CPU with AMX): the reference's small-computer config, which beat a width-128 model by 0.03-0.08 on
# such a CPU; not yet swept there. cpu (fp32 CPUs, Apple MPS): the best of bench/cpu_defaults.py's sweep on a
# 2-core AMD EPYC (bench/results/cpu-defaults-cpu-AMD-EPYC-2-threads.json). A CPU's masked SDPA computes the
# whole T x T scores whatever the window, so short windows save nothing there: L everywhere.
if PROFILE == "gpu":
    DEPTH = 8                     # transformer blocks
    ASPECT_RATIO = 64             # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
    HEAD_DIM = 128                # channels per attention head
    WINDOW_PATTERN = "SSSL"       # per layer, repeated: L = full context, S = half; the last layer is always L
    TOTAL_BATCH_SIZE = 2**19      # tokens per optimizer step
    DEVICE_BATCH_SIZE = 128       # sequences per forward/backward; gradient accumulation makes up the rest
elif PROFILE == "cpu-bf16":
    DEPTH = 4
    ASPECT_RATIO = 64
    HEAD_DIM = 128
    WINDOW_PATTERN = "L"
    TOTAL_BATCH_SIZE = 2**14
    DEVICE_BATCH_SIZE = 64
else:
    DEPTH = 5
    ASPECT_RATIO = 25             # width 125, rounded up to 128: 2 heads of 64
    HEAD_DIM = 64
    WINDOW_PATTERN = "L"
    TOTAL_BATCH_SIZE = 2**13
    DEVICE_BATCH_SIZE = 32

# ---------------------------------------------------------------------------
# Attention: one signature, three backends
# ---------------------------------------------------------------------------
# attention(q, k, v, window): q (B, T, H, D), k and v (B, T, Hkv, D) with H a multiple of Hkv; causal, and
# query t sees keys t-window..t (FlashAttention-3's window_size=(window, 0)); window >= T-1 is full context.
# SDPA alone also takes a boolean mask as the window (True = attend): the rows a MoR loop gathers (Router).

FA3 = None             # flash_attn_interface module, set by pick_attention when the kernel loads
FLEX = flex_attention  # compiled by prepare_attention on CUDA (eager Flex is an unfused O(T^2) fallback)
FLEX_BLOCK_MASKS = {}  # (T, window) -> BlockMask, built once by prepare_attention


def attention_fa3(q, k, v, window):
    y = FA3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp


def attention_flex(q, k, v, window):
    block_mask = FLEX_BLOCK_MASKS[(q.size(1), window)]
    y = FLEX(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def attention_sdpa(q, k, v, window):
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if isinstance(window, torch.Tensor):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window, enable_gqa=gqa)
    elif window >= T - 1:  # full context: is_causal keeps the fused kernels
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        t = torch.arange(T, device=q.device)
        offset = t[:, None] - t[None, :]
        mask = (offset >= 0) & (offset <= window)  # True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


ATTENTION_BACKENDS = {"fa3": attention_fa3, "flex": attention_flex, "sdpa": attention_sdpa}


def prepare_attention(backend, seq_len, windows, device):
    """Build what a backend needs once, outside any compiled region: Flex block masks per window size, and
    compiled Flex on CUDA (torch has no Flex backward on CPU: there it runs eager, forward only)."""
    global FLEX
    if backend != "flex":
        return
    if torch.device(device).type == "cuda":
        FLEX = torch.compile(flex_attention, dynamic=False)
    for w in windows:
        FLEX_BLOCK_MASKS[(seq_len, w)] = create_block_mask(sliding_causal(w), None, None, seq_len, seq_len,
                                                           device=device)


def sliding_causal(window):
    """Flex's mask_mod for one window, a closure: torch 2.10's Flex (eager and compiled) reuses the first traced
    function for a later one of the same code that differs only in a default argument, so every window became
    the first one (tests/test_model.py caught it)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask_mod


# FlashAttention-3 through `kernels`. kernels-community is the kernels project's own organisation, a trusted
# publisher, which kernels >= 0.15 loads without trust_remote_code (kernels/hf_hub.py, _check_trust_remote_code);
# its flash-attn3 v1 builds cover Ampere and Hopper, loaded this way by modded-nanogpt since its record 29. The
# reference's first choice, varunneal/flash-attention-3, is a personal repository that the trust check refuses.
FA3_REPO, FA3_VERSION = "kernels-community/flash-attn3", 1


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading


def hub_reachable(timeout=1.5):
    """Whether the hub answers on TCP: HF_ENDPOINT's host (a lab's mirror) or huggingface.co."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except (OSError, TypeError):
        return False


def load_fa3():
    """(flash_attn_interface or None, why). With the hub unreachable `kernels` retries for ~25 s, so probe it first
    and go offline, where only the local cache is tried."""
    if not hub_offline() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub when `kernels` imports it
    try:
        from kernels import get_kernel
        kernel = get_kernel(FA3_REPO, version=FA3_VERSION)
    except Exception as e:  # no `kernels`, offline and not cached, no build for this torch or GPU, ...
        return None, f"{FA3_REPO} v{FA3_VERSION}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    return getattr(kernel, "flash_attn_interface", kernel), f"FlashAttention-3 from {FA3_REPO} v{FA3_VERSION}"


def fa3_problem():
    """None when the loaded FA3 runs and matches SDPA on a small bf16 input with a window, else what went wrong:
    a build can load and still fail at its first call."""
    try:
        q, k, v = (torch.randn(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        error = (attention_fa3(q, k, v, 127) - attention_sdpa(q, k, v, 127)).abs().max().item()
    except Exception as e:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    return None if error < 0.05 else f"its output differs from SDPA's by {error:.3g}"


def pick_attention(device):
    global FA3
    if device != "cuda":
        return "sdpa", f"{device}: SDPA (FlashAttention-3 and compiled FlexAttention need CUDA)"
    FA3, why = load_fa3()
    problem = fa3_problem() if FA3 is not None else None
    if FA3 is not None and problem is None:
        return "fa3", why
    if problem:
        FA3, why = None, f"{why} failed its check: {problem}"
    return "flex", f"FlexAttention, compiled (FlashAttention-3 unavailable: {why})"

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

VE_GATE_CHANNELS = 32  # leading channels of x that drive the value-embedding gate
SOFTCAP = 15.0         # logits = SOFTCAP * tanh(logits / SOFTCAP)
TIME_FEATURES = 32     # loopformer: sinusoid features of t and dt; LoopFormer's 256 barely differ for t in [0, 1)


@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "SSSL"
    n_loops: int = 1
    loop_conditioning: str = "gates"  # gates or loopformer
    loop_routing: str = "none"        # none or mor
    mor_capacity: tuple = (1.0, 0.5)  # mor: the most tokens each loop may take, a fraction of the sequence
    attention: str = "sdpa"  # a key of ATTENTION_BACKENDS


def model_config(depth, vocab_size, attention="sdpa"):
    """The config the constants describe: width from DEPTH * ASPECT_RATIO, heads of HEAD_DIM channels."""
    model_dim = -(-depth * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN, n_loops=N_LOOPS,
                     loop_conditioning=LOOP_CONDITIONING, loop_routing=LOOP_ROUTING, mor_capacity=MOR_CAPACITY,
                     attention=attention)


def check_loops(config):
    if config.loop_conditioning not in ("gates", "loopformer") or config.loop_routing not in ("none", "mor"):
        raise SystemExit(f"LOOP_CONDITIONING = {config.loop_conditioning!r}, LOOP_ROUTING = {config.loop_routing!r}: "
                         "use gates or loopformer, and none or mor")
    capacity = config.mor_capacity
    if config.loop_routing == "mor" and not (isinstance(capacity, (tuple, list)) and len(capacity) == config.n_loops
                                             and capacity[0] == 1 and all(0 < c <= 1 for c in capacity)):
        raise SystemExit(f"MOR_CAPACITY = {capacity!r}: give N_LOOPS = {config.n_loops} fractions in (0, 1], "
                         "the first 1.0 (the first loop runs every token)")


def norm(x):
    """RMS norm in x's dtype: CUDA autocast runs rms_norm in fp32 (torch >= 2.12), which would leave q and k fp32
    beside a bf16 v and turn the residual stream fp32."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def layer_windows(config):
    """Window per layer from the pattern: L = full context, S = half context; the last layer is always full."""
    full, half = config.sequence_len, config.sequence_len // 2
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"window_pattern {config.window_pattern!r}: use only the letters S and L")
    windows = [{"L": full, "S": half}[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = full
    return windows


def sinusoid(t, dim):
    """DiT's timestep features of t (N,): cos and sin of t times dim/2 frequencies from 1 down to 1e-4."""
    angles = t[:, None] * 1e4 ** -(torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rotary_tables(seq_len, head_dim, dtype, device, base=10000):
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) of the head dimension by its position's angle. x is (B, T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)
        self.attend = ATTENTION_BACKENDS[config.attention]

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value embedding, gated per kv head; the zero-initialised gate starts at 1
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q = norm(apply_rotary(q, cos, sin))
        k = norm(apply_rotary(k, cos, sin))
        y = (self.attend if isinstance(window, int) else attention_sdpa)(q, k, v, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Router(nn.Module):
    """Mixture-of-Recursions routing (arXiv 2507.10524) for one loop, made causal for training and evaluation alike:
    MoR's expert-choice top-k over the sequence lets later tokens decide whether an earlier one runs. Here each
    token chooses (token-choice, MoR's other variant) under a causal cap: it is taken when its logit is >= 0, the
    loop before took it, and fewer than k = ceil(capacity * T) tokens before it were taken."""

    def __init__(self, n_embd, capacity):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_embd))  # zero: every token starts wanting the loop
        self.capacity = capacity

    def rows(self, T):
        return math.ceil(round(self.capacity * T, 6))  # rounded first: 0.7 * 10 is 7.000000000000001

    def forward(self, x, selected):
        """(taken (B, T), order (B, k): the taken tokens in position order, then untaken ones as padding,
        sigmoid of the logits (B, T))."""
        T, k = x.size(1), self.rows(x.size(1))
        logits = norm(x) @ self.weight
        wants = (logits >= 0) & selected
        taken = wants & (wants.cumsum(dim=1) <= k)
        position = torch.arange(T, device=x.device)
        order = torch.where(taken, position, position + T).argsort(dim=1)[:, :k]
        return taken, order, torch.sigmoid(logits)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        # looped model, gates: per-channel gates of the attention and MLP branches from the loop's embedding
        # (LoopFormer, arXiv 2602.11451, minimally); zero-initialised, so every extra loop starts as the identity.
        # loopformer: its adaLN-Zero, gates and input scales of both branches from the loop's time (GPT.conditions)
        loopformer = config.loop_conditioning == "loopformer"
        self.loop_gate = (nn.Linear(config.n_embd, (4 if loopformer else 2) * config.n_embd, bias=loopformer)
                          if config.n_loops > 1 else None)

    def forward(self, x, ve, cos, sin, window, condition=None):
        # this loop's gates of both branches and, under loopformer, scales of their inputs (0 otherwise)
        gates = (1.0, 1.0) if condition is None else self.loop_gate(condition).split(x.size(-1))
        g_attn, g_mlp, s_attn, s_mlp = (*gates, 0.0, 0.0)[:4]
        x = x + g_attn * self.attn(norm(x) * (1 + s_attn), ve, cos, sin, window)
        return x + g_mlp * self.mlp(norm(x) * (1 + s_mlp))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_loops(config)
        self.config = config
        self.window_sizes = layer_windows(config)
        head_dim = config.n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        n_applied = config.n_layer * config.n_loops  # a looped layer gets its own scalars on every loop
        self.resid_lambdas = nn.Parameter(torch.ones(n_applied))   # scale the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.zeros(n_applied))     # mix the embedding back in per layer
        loopformer = config.loop_conditioning == "loopformer" and config.n_loops > 1
        self.loop_embeds = nn.ParameterList(torch.zeros(config.n_embd) for _ in range(config.n_loops - 1)
                                            if not loopformer)
        # loopformer: embedders of the loop's time t and step dt (DiT's: sinusoid features, Linear, SiLU, Linear)
        self.time_embeds = nn.ModuleList(nn.Sequential(nn.Linear(TIME_FEATURES, config.n_embd), nn.SiLU(),
                                                       nn.Linear(config.n_embd, config.n_embd))
                                         for _ in range(2 if loopformer else 0))
        self.routers = nn.ModuleList(Router(config.n_embd, c) for c in config.mor_capacity[1:]
                                     if config.loop_routing == "mor")
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_kv_head * head_dim)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        cos, sin = rotary_tables(config.sequence_len, head_dim, torch.float32, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, dtype):
        """Initialise on the parameters' device; embeddings and rotary tables are stored in the compute dtype."""
        d = self.config.n_embd
        bound = (3 / d) ** 0.5  # uniform(-bound, bound) has std 1/sqrt(d)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            # zero projections start every block as the identity; LoopFormer's zero gates do that already, and a
            # zero gate on a zero projection is a saddle no gradient leaves: there they draw, as in its paper
            for projection in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                if self.time_embeds:
                    nn.init.uniform_(projection, -bound, bound)
                else:
                    nn.init.zeros_(projection)
            for gate in (block.attn.ve_gate, block.loop_gate):
                if gate is not None:
                    for p in gate.parameters():  # weight, and bias under loopformer
                        nn.init.zeros_(p)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for loop_embed in self.loop_embeds:  # last, so the shared weights draw what N_LOOPS = 1 draws
            nn.init.normal_(loop_embed, std=1.0)
        for linear in (m for m in self.time_embeds.modules() if isinstance(m, nn.Linear)):
            nn.init.uniform_(linear.weight, -(3 / linear.in_features) ** 0.5, (3 / linear.in_features) ** 0.5)
            nn.init.zeros_(linear.bias)
        for router in self.routers:
            nn.init.zeros_(router.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.zero_()
        self.x0_lambdas[:self.config.n_layer] = 0.1  # 0 on extra loops keeps them the identity at first
        self.wte.to(dtype)
        self.value_embeds.to(dtype)
        device = self.wte.weight.device
        self.cos, self.sin = rotary_tables(self.config.sequence_len, d // self.config.n_head, dtype, device)
        prepare_attention(self.config.attention, self.config.sequence_len, set(self.window_sizes), device)

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))
        n_layer = self.config.n_layer
        ves = [self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None for i in range(n_layer)]
        taken, aux_loss = torch.ones_like(idx, dtype=torch.bool), 0.0
        for loop, condition in enumerate(self.conditions()):  # rotary, value embeddings and x0 the same every loop
            if loop == 0 or not self.routers:
                x = self.recursion(x, x0, ves, cos, sin, self.window_sizes, loop, condition)
            else:
                x, taken, capacity_miss = self.routed_recursion(x, x0, ves, loop, condition, taken)
                aux_loss = aux_loss + MOR_AUX_WEIGHT * capacity_miss
        logits = self.lm_head(norm(x)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss + aux_loss if reduction == "mean" else loss  # the training loss; evaluate_bpb's stays pure

    def conditions(self):
        """Per loop, the vector every block's loop_gate reads (None: ungated). gates: the loop's embedding, from the
        second loop on; loopformer: SiLU(c) on every loop, c = TimeEmb(t) + DtEmb(dt), t = loop / N_LOOPS and
        dt = 1 / N_LOOPS (its uniform trajectory)."""
        if not self.time_embeds:
            return [None] + [norm(loop_embed) for loop_embed in self.loop_embeds]
        n = self.config.n_loops
        t = torch.arange(n, device=self.cos.device) / n
        time_embed, step_embed = self.time_embeds
        c = time_embed(sinusoid(t, TIME_FEATURES)) + step_embed(sinusoid(torch.full_like(t, 1 / n), TIME_FEATURES))
        return list(F.silu(c))

    def recursion(self, x, x0, ves, cos, sin, windows, loop, condition):
        """One pass of the shared blocks; `loop` picks the per-layer scalars."""
        for i, block in enumerate(self.blocks):
            j = loop * self.config.n_layer + i
            x = self.resid_lambdas[j] * x + self.x0_lambdas[j] * x0
            x = block(x, ves[i], cos, sin, windows[i], condition)
        return x

    def routed_recursion(self, x, x0, ves, loop, condition, selected):
        """A MoR loop: the blocks run on the k rows per sequence that its router gathers, each with its own rotary
        position, value embedding and x0, attending causally by position within its window; only taken rows are
        written back, so an untaken token's state passes bit for bit. Returns (x, taken, capacity miss)."""
        router = self.routers[loop - 1]
        taken, order, probability = router(x, selected)

        def gather(t):
            return t.gather(1, order[..., None].expand(-1, -1, t.size(-1)))

        rows, k = gather(x), order.size(1)
        causal = torch.ones(k, k, dtype=torch.bool, device=x.device).tril()  # padding slots follow all taken ones
        offset = order[:, :, None] - order[:, None, :]
        masks = {w: (causal & (offset <= w))[:, None] for w in set(self.window_sizes)}
        update = self.recursion(rows, gather(x0), [ve if ve is None else gather(ve) for ve in ves],
                                self.cos[0, order], self.sin[0, order], [masks[w] for w in self.window_sizes],
                                loop, condition)
        p = gather(probability[..., None])
        update = update + (update - rows) * (p - p.detach())  # straight-through: value exact, gradient to the router
        kept = torch.where(taken.gather(1, order)[..., None], update, rows)  # padding slots: their own old state
        x = x.scatter(1, order[..., None].expand_as(rows), kept)
        return x, taken, (probability.float().mean() - router.capacity) ** 2

    def num_flops_per_token(self):
        """Training FLOPs per token: 6 per weight that multiplies a token (embedding lookups and the per-loop gates
        excluded), plus attention; the blocks count once per loop. A routed loop counts what it runs: its router on
        every token, the blocks on k of T rows, attention over all k of them (masked SDPA)."""
        block_matmuls = sum(p.numel() for name, p in self.blocks.named_parameters() if "loop_gate" not in name)
        width = self.config.n_head * (self.config.n_embd // self.config.n_head)
        T = self.config.sequence_len
        attention = sum(12 * width * min(w + 1, T) for w in self.window_sizes)
        unrouted = self.config.n_loops - len(self.routers)
        flops = 6 * self.lm_head.weight.numel() + unrouted * (6 * block_matmuls + attention)
        for router in self.routers:
            k = router.rows(T)
            flops += 6 * self.config.n_embd + k / T * (6 * block_matmuls + 12 * width * k * self.config.n_layer)
        return flops

    def matrix_layers(self):
        """Every Linear but the head: the blocks' and LoopFormer's time embedders'."""
        return [m for m in self.modules() if isinstance(m, nn.Linear) and m is not self.lm_head]

    def setup_optimizer(self, orth_dtype=torch.bfloat16, compile=False):
        """AdamW for embeddings, head, scalars, routers and biases; MATRIX_OPTIMIZER for the weights of
        matrix_layers (loop gates included), one group per shape."""
        if MATRIX_OPTIMIZER not in MATRIX_RULES and MATRIX_OPTIMIZER != "adamw":
            raise SystemExit(f"MATRIX_OPTIMIZER = {MATRIX_OPTIMIZER!r}: use one of {', '.join(MATRIX_RULES)}, adamw")
        lr_scale = (self.config.n_embd / 768) ** -0.5  # the Adam lrs were tuned at width 768
        adam = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(adam, params=[self.lm_head.weight], lr=UNEMBEDDING_LR * lr_scale),
            dict(adam, params=[self.wte.weight, *self.loop_embeds], lr=EMBEDDING_LR * lr_scale),
            dict(adam, params=list(self.value_embeds.parameters()), lr=EMBEDDING_LR * lr_scale),
            dict(adam, params=[self.resid_lambdas], lr=SCALAR_LR * 0.01),
            dict(adam, params=[self.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
            dict(adam, params=[r.weight for r in self.routers], lr=UNEMBEDDING_LR * lr_scale),  # one-logit heads
            # LoopFormer's biases, at the lr of the weights they sit beside
            dict(adam, params=[m.bias for m in self.matrix_layers() if m.bias is not None], lr=MATRIX_LR),
        ]
        matrices = [m.weight for m in self.matrix_layers()]
        if MATRIX_OPTIMIZER == "adamw":
            groups.append(dict(adam, params=matrices, lr=MATRIX_LR, weight_decay=WEIGHT_DECAY))
        else:
            for shape in sorted({p.shape for p in matrices}):
                same_shape = [p for p in matrices if p.shape == shape]
                groups.append(dict(kind="matrix", rule=MATRIX_OPTIMIZER, params=same_shape, lr=MATRIX_LR,
                                   momentum=MUON_MOMENTUM_START, beta2=NORMUON_BETA2, ns_steps=NS_STEPS,
                                   weight_decay=WEIGHT_DECAY))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        return MuonAdamW([g for g in groups if g["params"]], orth_dtype=orth_dtype, compile=compile)

# ---------------------------------------------------------------------------
# Optimizer: AdamW, and a table of update rules for the block matrices (Muon and its variants)
# ---------------------------------------------------------------------------

# Polar Express quintics (a, b, c), one per iteration: Amsel et al. arXiv 2505.16932, the set used by
# modded-nanogpt and nanochat (num_iters=5, safety factor 2e-2, cushion 2%)
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# iterations past the 5 above repeat the quintic with a fixed point at 1 (p(1) = 1, p'(1) = 0), as the Polar
# Express paper's Algorithm 1 does past its own list
POLISH_COEFFS = (1.875, -1.25, 0.375)
# Newton-Muon's input statistics: gathered every 16 steps into an EMA with decay 0.8 (the record #28 settings of
# zhehangdu/Newton-Muon, train_gpt_newton_muon_2.py)
NEWTON_REFRESH_STEPS = 16
NEWTON_EMA = 0.8


def polar_express(G, ns_steps=NS_STEPS, dtype=torch.bfloat16):
    """Approximate U V^T of G = U S V^T (batched over leading dims), computed in `dtype`. Each quintic maps a
    singular value s to a*s + b*s^3 + c*s^5; the Gram matrix is taken over the smaller side."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= ||X||_F, with 2% margin
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps] + [POLISH_COEFFS] * (ns_steps - len(POLAR_EXPRESS_COEFFS)):
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def normuon(O, second_moment, beta2):
    """NorMuon (arXiv 2510.05491): divide O by the EMA of its mean square along the smaller side (one statistic
    per index of the larger side, as in modded-nanogpt and nanochat), then restore O's Frobenius norm."""
    reduce_dim = -1 if O.size(-2) >= O.size(-1) else -2
    second_moment.lerp_(O.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    scaled = O * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (O.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def nesterov_(grads, momentum_buffer, momentum):
    """Muon's Nesterov momentum in EMA form: updates the buffer in place, returns the look-ahead direction."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    return grads.lerp(momentum_buffer, momentum)


def shape_factor(params):
    return max(1.0, params.size(-2) / params.size(-1)) ** 0.5  # Keller Jordan's lr scale for tall matrices

# Update rules for a stack of same-shape matrices (leading dim = which matrix): each returns the update and the
# factor on the group's lr with which cautious_update_ applies it, and keeps its state in the buffers passed in.

def muon_rule(grads, params, momentum_buffer, momentum, ns_steps, orth_dtype, **_):
    O = polar_express(nesterov_(grads, momentum_buffer, momentum), ns_steps, orth_dtype)
    return O.to(params.dtype), shape_factor(params)


def normuon_rule(grads, params, momentum_buffer, second_moment, momentum, beta2, ns_steps, orth_dtype, **_):
    O = polar_express(nesterov_(grads, momentum_buffer, momentum), ns_steps, orth_dtype)
    return normuon(O.to(params.dtype), second_moment, beta2), shape_factor(params)


def newton_muon_rule(grads, params, preconditioner, **muon_args):
    """Newton-Muon (arXiv 2604.01472): Muon on the raw gradient right-multiplied by the inverse of its layer's
    input second moment (MuonAdamW.refresh_preconditioners keeps it; the identity until the first refresh)."""
    return muon_rule(grads @ preconditioner.to(grads.dtype), params, **muon_args)


def adamuon_rule(grads, params, momentum_buffer, second_moment, momentum, ns_steps, orth_dtype, **_):
    """AdaMuon (arXiv 2507.11005; Chongjie-Si/AdaMuon at 369f0b3): orthogonalise the sign of the Nesterov
    direction, divide by the EMA of its element-wise square (beta2 = momentum, no bias correction, float32),
    then rescale every matrix to an RMS of 0.2."""
    O = polar_express(nesterov_(grads, momentum_buffer, momentum).sign(), ns_steps, orth_dtype).float()
    second_moment.lerp_(O.square(), 1 - momentum)
    U = O / (second_moment.sqrt() + 1e-8)
    U = U * (0.2 * U[0].numel() ** 0.5 / (U.norm(dim=(-2, -1), keepdim=True) + 1e-8))
    return U.to(params.dtype), 1.0


def mano_rule(grads, params, momentum_buffer, momentum, odd_step, **_):
    """Mano (arXiv 2601.23000 v2; xie-lab-ml/Mano-Restriking-Manifold-Optimization-for-LLM-Training mano_v2.py):
    no orthogonalisation. Heavy-ball momentum with Nesterov look-ahead, projected onto the tangent space of the
    oblique manifold at W along the columns on even steps and the rows on odd ones, normalised along that axis."""
    dim = -1 if odd_step else -2  # -2: each column is one vector
    momentum_buffer.mul_(momentum).add_(grads)
    D = grads + momentum * momentum_buffer
    T = D - (D * params).sum(dim=dim, keepdim=True) * params
    return (0.2 * params.size(dim) ** 0.5) * T / (T.norm(dim=dim, keepdim=True) + 1e-8), 1.0


MATRIX_RULES = {"normuon": normuon_rule, "muon": muon_rule, "adamuon": adamuon_rule, "mano": mano_rule,
                "newton_muon": newton_muon_rule}


def cautious_update_(params, update, lr, weight_decay):
    """p -= lr * (u + wd * p), decaying only where u and p share a sign (cautious weight decay, arXiv 2510.12402)."""
    decay = (update * params >= 0).to(params.dtype)
    params.sub_(lr * (update + weight_decay * params * decay))


def matrix_step(rule, params, grads, buffers, momentum, lr, weight_decay, beta2, ns_steps, orth_dtype, odd_step):
    """One step of MATRIX_RULES[rule] on a stack of same-shape matrices, updated in place."""
    update, lr_factor = MATRIX_RULES[rule](grads, params, **buffers, momentum=momentum, beta2=beta2,
                                           ns_steps=ns_steps, orth_dtype=orth_dtype, odd_step=odd_step)
    cautious_update_(params, update, lr * lr_factor, weight_decay)


def matrix_buffers(rule, stacked):
    """The state a rule keeps for a stack of (rows, cols) matrices."""
    buffers = dict(momentum_buffer=torch.zeros_like(stacked))
    rows, cols = stacked.shape[-2:]
    if rule == "normuon":  # one second moment per index of the larger side
        buffers["second_moment"] = stacked.new_zeros(len(stacked), rows, 1) if rows >= cols else \
            stacked.new_zeros(len(stacked), 1, cols)
    if rule == "adamuon":
        buffers["second_moment"] = torch.zeros_like(stacked, dtype=torch.float32)
    if rule == "newton_muon":  # float32 whatever the parameters' dtype; the identity until the first refresh
        buffers["preconditioner"] = torch.eye(cols, device=stacked.device).repeat(len(stacked), 1, 1)
    return buffers


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """Decoupled AdamW (Loshchilov & Hutter), same algebra as torch.optim.AdamW; updated in place."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps
    param.sub_(lr / (1 - beta1 ** step) * exp_avg / denom)


@torch.no_grad()
def input_second_moments(model, idx):
    """{weight: X^T X / N of its input} for every weight of model.matrix_layers() over one forward of idx, averaged
    over the loops that apply it: Newton-Muon's statistics. In a routed loop only the rows of taken tokens count."""
    sums, routed_rows = {}, []
    def record(module, args, output):
        x = args[0]
        if routed_rows and x.dim() == 3:  # the blocks' rows of a routed loop, padding slots left out
            x = x[routed_rows[-1]]
        x = x.reshape(-1, x.size(-1)).float()
        if not len(x):  # a routed loop that took no token
            return
        with torch.autocast(x.device.type, enabled=False):  # float32 statistics under a bf16 forward too
            total, calls = sums.get(module.weight, (0.0, 0))
            sums[module.weight] = (total + x.T @ x / len(x), calls + 1)
    hooks = [module.register_forward_hook(record) for module in model.matrix_layers()]
    hooks += [router.register_forward_hook(lambda router, args, out: routed_rows.append(out[0].gather(1, out[1])))
              for router in model.routers]  # out: taken, order, probability
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return {weight: total / calls for weight, (total, calls) in sums.items()}


class MuonAdamW(torch.optim.Optimizer):
    """Param groups of kind "adamw" (lr, betas, eps, weight_decay) or "matrix" (rule, lr, momentum, beta2,
    ns_steps, weight_decay; all params one shape, stepped as one stack). Changing scalars travel as 0-D tensors
    so compiled steps never recompile when the schedules move them."""

    def __init__(self, param_groups, orth_dtype=torch.bfloat16, compile=False):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
        self.orth_dtype = orth_dtype
        # dynamic shapes: one graph serves every parameter shape (AdamW sees them flattened), so the graphs stay
        # few (per dtype, rule and flag) and far below dynamo's recompile limit of 8 for any model
        maybe_compile = (lambda f: torch.compile(f, dynamic=True, fullgraph=True)) if compile else (lambda f: f)
        self._adamw_step, self._matrix_step = maybe_compile(adamw_step), maybe_compile(matrix_step)
        self._scalars = {name: torch.tensor(0.0) for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "mom")}

    def _scalar(self, name, value):
        return self._scalars[name].fill_(value)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (self._step_adamw if group["kind"] == "adamw" else self._step_matrix)(group)

    def _step_adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._adamw_state(p)
            state["step"] += 1
            self._adamw_step(p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                             self._scalar("step", state["step"]),
                             self._scalar("lr", group["lr"]), self._scalar("beta1", group["betas"][0]),
                             self._scalar("beta2", group["betas"][1]), self._scalar("eps", group["eps"]),
                             self._scalar("wd", group["weight_decay"]))

    @torch.no_grad()
    def init_state(self):
        """Allocate every buffer now rather than at the first step, so memory measured before it is what training
        needs."""
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    self._adamw_state(p)
            else:
                self._matrix_state(group)

    def _adamw_state(self, p):
        state = self.state[p]
        if not state:
            state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        return state

    def _matrix_state(self, group):
        state = self.state[group["params"][0]]
        if not state:
            state["step"], state["buffers"] = 0, matrix_buffers(group["rule"], torch.stack(group["params"]))
        return state

    def _step_matrix(self, group):
        params = group["params"]
        stacked = torch.stack(params)
        grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        state = self._matrix_state(group)
        self._matrix_step(group["rule"], stacked, grads, state["buffers"], self._scalar("mom", group["momentum"]),
                          self._scalar("lr", group["lr"]), self._scalar("wd", group["weight_decay"]),
                          self._scalar("beta2", group["beta2"]), group["ns_steps"], self.orth_dtype,
                          state["step"] % 2 == 1)
        state["step"] += 1
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def refresh_preconditioners(self, input_moments):
        """Newton-Muon: fold each weight's input second moment into its EMA K, then store (K + ridge)^-1 by a
        float32 Cholesky inverse (the identity where K is not positive definite); ridge = 0.2 tr(K) / n."""
        for group in self.param_groups:
            if group.get("rule") != "newton_muon":
                continue
            state = self._matrix_state(group)
            moments = torch.stack([input_moments[p] for p in group["params"]])
            eye = torch.eye(moments.size(-1), device=moments.device)
            K = state.setdefault("input_moment", 1e-3 * eye.expand_as(moments).clone())  # the EMA starts at 1e-3 I
            K.lerp_(moments, 1 - NEWTON_EMA)
            ridge = 0.2 * K.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-8
            L, info = torch.linalg.cholesky_ex(K + ridge[:, None, None] * eye)
            state["buffers"]["preconditioner"] = torch.where((info == 0)[:, None, None], torch.cholesky_inverse(L), eye)

# ---------------------------------------------------------------------------
# Set-up decisions: one small function each, returning the choice and why (printed at start-up)
# ---------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device name, first match wins: NVIDIA's datasheets give
# them with 2:4 sparsity, halved here. H100/H200 SXM and GH200: H100 datasheet 1,979 -> 989.5; H100 PCIe: 1,513
# -> 756.5; H100 NVL and H200 NVL: 1,671 -> 835.5; A100: 624 -> 312; L40S and L40 list dense 362.05 and 181.05; L4:
# 242 -> 121; A10: 250 -> 125; RTX A6000: 309.7 -> 154.8. GeForce, from the architecture whitepapers (bf16 with
# fp32 accumulate, dense): RTX 3090 71 (GA102), RTX 4090 165.2 (Ada), RTX 5090 209.5 (RTX Blackwell).
BF16_PEAK_FLOPS = [
    (r"H100 PCIe", 756.5e12), (r"H[12]00 NVL", 835.5e12), (r"H100|H200|GH200", 989.5e12), (r"A100", 312e12),
    (r"L40S", 362.05e12), (r"\bL40\b", 181.05e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12),
    (r"RTX A6000", 154.8e12), (r"RTX 3090", 71e12), (r"RTX 4090", 165.2e12), (r"RTX 5090", 209.5e12),
]


CUDA_MIN_DRIVER = {"12": "525", "13": "580"}  # Linux driver per CUDA major: NVIDIA's CUDA Compatibility guide


def pick_device():
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    driver = nvidia_driver()
    if driver and os.environ.get("CUDA_VISIBLE_DEVICES") != "":  # set empty, it hides the GPU on purpose
        cuda = torch.version.cuda
        why = (f"it is built for CUDA {cuda}, which needs driver {CUDA_MIN_DRIVER.get(cuda.split('.')[0], '?')} "
               "or newer" if cuda else "it is a CPU-only build")
        raise SystemExit(f"an NVIDIA GPU is here (driver {driver}) but torch {torch.__version__} cannot use it: "
                         f"{why}. Update the driver or install a torch built for it (README, Drivers); "
                         "`CUDA_VISIBLE_DEVICES= uv run train.py` trains on the CPU on purpose")
    if torch.backends.mps.is_available():
        return "mps", "Apple GPU (Metal)"
    return "cpu", f"{cpu_name()}, {torch.get_num_threads()} threads"


def nvidia_driver():
    """The loaded NVIDIA driver's version when there is one, else None: /proc/driver/nvidia/version on Linux,
    nvidia-smi elsewhere (WSL)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", f.read())
        return found.group(1) if found else "of unknown version"
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def matmul_seconds(device, dtype, n=512, reps=3):
    a = torch.full((n, n), 0.5, dtype=dtype, device=device)
    a @ a
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def pick_dtype(device):
    """Compute dtype: bf16 on CUDA GPUs that have it natively and on the cpu-bf16 profile (a CPU with AMX); fp32
    on other CPUs; on MPS, whichever a matmul probe finds faster."""
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what stays in fp32
        if not torch.cuda.is_bf16_supported(including_emulation=False):  # before Ampere: emulated, slow
            return torch.float32, f"fp32: no native bf16 on compute capability {torch.cuda.get_device_capability()}"
        return torch.bfloat16, "bf16 autocast on CUDA"
    if device == "cpu":
        if PROFILE == "cpu-bf16":
            return torch.bfloat16, "bf16: profile cpu-bf16 (AMX multiplies bf16 at 4-7x the fp32 speed)"
        return torch.float32, f"fp32: profile {PROFILE} (without AMX, bf16 matmuls measured 1.7-140x slower)"
    return probe_dtype(device)


def probe_dtype(device):
    """bf16 if a 512x512 matmul on this device runs clearly faster in it than in fp32, else fp32."""
    fp32 = bf16 = math.inf
    for _ in range(3):  # interleaved, best of 3: a burst of other load hits both dtypes alike
        fp32 = min(fp32, matmul_seconds(device, torch.float32))
        bf16 = min(bf16, matmul_seconds(device, torch.bfloat16))
        if bf16 > 2 * fp32:  # clearly slower: no need to measure it again
            break
    if bf16 < 0.8 * fp32:
        return torch.bfloat16, f"bf16: a 512x512 matmul takes {bf16 / fp32:.2f}x the fp32 time here"
    return torch.float32, f"fp32: a 512x512 bf16 matmul takes {bf16 / fp32:.1f}x the fp32 time here"


def cxx_problem():
    """None when the C++ compiler that inductor builds CPU kernels with runs, else why not. torch's own check
    (`$CXX --version`; g++ by default, clang++ on macOS, cl on Windows), in the module torch.compile loads anyway."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler; a RuntimeError when Windows has no cl
        return (str(e).splitlines() or [type(e).__name__])[0][:160]
    return None


def pick_compile(device):
    """(compile the model, compile the optimizer steps, why)."""
    if device == "cuda":
        return True, True, "CUDA: model and optimizer steps; compile time is repaid within the first minute"
    if device == "mps":
        return False, False, "MPS: eager (inductor support for Metal is partial)"
    problem = cxx_problem()
    if problem:
        return False, False, f"CPU: eager ({problem}); install g++ or set CXX to compile, 1.3-1.8x faster steps"
    # measured on a 2-core AMD EPYC (d4 w128): ~25 s to compile, then 1.3-1.8x faster steps as the softcap and
    # cross-entropy over 8192 logits fuse; the optimizer is 3-4% of a step, its Polar Express matmuls, and
    # compiling it left that time unchanged (203-248 ms either way at width 256)
    return True, False, "CPU: the model only; compile time is repaid within the first minute"


def trial_step(train_model, model, autocast, device):
    """try_rows for pick_micro_batch: one forward and backward of `rows` rows at the real shapes, gradients
    cleared after."""
    def try_rows(rows):
        x = torch.zeros(rows, MAX_SEQ_LEN, dtype=torch.long, device=device)
        try:
            with autocast:
                train_model(x, x).backward()
        finally:
            model.zero_grad(set_to_none=True)
    return try_rows


def cuda_free_gb():
    """GPU memory this process may still take: free memory, capped by set_per_process_memory_fraction."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return min(free, fraction * total - torch.cuda.memory_reserved()) / 2**30


def pick_micro_batch(device, try_rows):
    """(rows per forward and backward, why). DEVICE_BATCH_SIZE, except on CUDA where it does not fit in memory: then
    the largest power of two below it for which try_rows(rows), a forward and backward, does not run out of memory.
    Gradient accumulation makes up TOTAL_BATCH_SIZE either way, so every card takes the same optimizer steps."""
    if device != "cuda":
        return DEVICE_BATCH_SIZE, "DEVICE_BATCH_SIZE"
    free_gb = cuda_free_gb()
    smaller = [2**i for i in reversed(range(DEVICE_BATCH_SIZE.bit_length())) if 2**i < DEVICE_BATCH_SIZE]
    too_big = []
    for rows in [DEVICE_BATCH_SIZE] + [r for r in smaller if TOTAL_BATCH_SIZE % (r * MAX_SEQ_LEN) == 0]:
        try:
            try_rows(rows)
        except torch.OutOfMemoryError:
            too_big.append(rows)
            continue
        finally:
            torch.cuda.empty_cache()
        return rows, (f"{too_big[0]} rows do not fit in {free_gb:.1f} GB free" if too_big else
                      f"DEVICE_BATCH_SIZE fits in {free_gb:.1f} GB free")
    raise SystemExit(f"not even one row of {MAX_SEQ_LEN} tokens fits in {free_gb:.1f} GB of GPU memory: make the "
                     "model smaller (DEPTH, ASPECT_RATIO, N_LOOPS)")


def budget_unit(device):
    """What the time budget counts. An accelerator is not shared, so wall time. A CPU is, and its speed also drifts
    between runs on a VM host (quiet 300 s runs took 191-209 steps): there the budget counts work, every step
    costing its FLOPs (prepare.step_flops) at CPU_FLOPS, so the steps depend on the model alone."""
    if device == "cpu":
        return f"work, each step's FLOPs counted at {CPU_FLOPS / 1e9:g} GFLOP/s (prepare.py's CPU_FLOPS)"
    return "wall clock"


def peak_memory_mb(device):
    """Peak memory in MiB, or None on MPS: Metal reports only the memory in use now, no peak."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def peak_flops(device):
    """This device's dense bf16 peak, or None when it is not in BF16_PEAK_FLOPS (MFU is then not reported)."""
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return next((flops for pattern, flops in BF16_PEAK_FLOPS if name and re.search(pattern, name)), None)


def describe():
    """Make every set-up decision and print it with its reason: the first lines of a run, and all that
    `uv run python -c "import train; train.describe()"` prints (it trains nothing)."""
    dataset = dataset_label()  # exits with the prepare.py command to run when nothing is prepared
    device, why = pick_device()
    print(f"device:    {device} ({why})")
    dtype, why = pick_dtype(device)
    print(f"precision: {why}")
    attention, why = pick_attention(device)
    print(f"attention: {attention} ({why})")
    compile_model, compile_optimizer, why = pick_compile(device)
    print(f"compile:   {why}")
    print(f"budget:    {TIME_BUDGET:g}s of {budget_unit(device)}")
    print(f"profile:   {PROFILE} ({PROFILE_REASON}), dataset {dataset}, context {MAX_SEQ_LEN}")
    return dataset, device, dtype, attention, compile_model, compile_optimizer

# ---------------------------------------------------------------------------
# Schedules, driven by progress = training time / budget
# ---------------------------------------------------------------------------

def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    remaining = (1 - progress) / WARMDOWN_RATIO
    return remaining + (1 - remaining) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_RAMP_STEPS, 1.0) if MUON_MOMENTUM_RAMP_STEPS > 0 else 1.0
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def weight_decay_multiplier(progress):
    return 1 - progress


def update_schedules(optimizer, step, progress):
    """Move every group's lr, weight decay and momentum to where the schedules put them; returns the lr multiplier."""
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(progress)
        if group["kind"] == "matrix":
            group["momentum"] = muon_momentum(step)
    return lrm

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def main():
    t_start = time.time()
    dataset, device, dtype, attention, compile_model, compile_optimizer = describe()
    tokenizer = Tokenizer.from_directory()
    torch.manual_seed(SEED)

    if TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN):
        raise SystemExit(f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
                         f"= {DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN} = {DEVICE_BATCH_SIZE * MAX_SEQ_LEN}: change one of them")

    config = model_config(DEPTH, tokenizer.get_vocab_size(), attention)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.num_flops_per_token()
    peak = peak_flops(device)
    print(f"model:     {config}")
    print(f"params:    {num_params / 1e6:.2f}M, {flops_per_token / 1e6:.1f} MFLOP/token, MFU "
          + (f"against {peak / 1e12:.1f} TFLOP/s bf16" if peak else "n/a (no known bf16 peak for this device)"))
    optimizer = model.setup_optimizer(orth_dtype=dtype, compile=compile_optimizer)
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    optimizer.init_state()  # its buffers exist before the micro-batch is fitted around them
    rows, why = pick_micro_batch(device, trial_step(train_model, model, autocast, device))
    grad_accum_steps = TOTAL_BATCH_SIZE // (rows * MAX_SEQ_LEN)
    print(f"batch:     {TOTAL_BATCH_SIZE:,} tokens/step = {grad_accum_steps} x {rows} x {MAX_SEQ_LEN} ({why})")
    train_loader = make_dataloader(tokenizer, rows, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)
    step_seconds = None  # what a step costs against the budget; None: its wall time
    if device == "cpu":
        with autocast:  # FLOPs are per row (all but the loop gates' few): one row is counted, in little memory
            flops = step_flops(model, x[:1], y[:1]) * rows * grad_accum_steps
        step_seconds = flops / CPU_FLOPS
        print(f"work:      {flops / 1e9:.1f} GFLOP/step = {step_seconds:.3f}s of the budget: "
              f"{11 + math.ceil(TIME_BUDGET / step_seconds)} steps")

    step, training_seconds, smooth_loss = 0, 0.0, 0.0
    while True:
        synchronize(device)
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        train_loss = loss.item()  # last micro-batch's loss
        if not math.isfinite(train_loss) or train_loss > 100:
            print(f"\nFAIL: training loss {train_loss} at step {step}")
            sys.exit(1)
        progress = min(training_seconds / TIME_BUDGET, 1.0)
        lrm = update_schedules(optimizer, step, progress)
        if MATRIX_OPTIMIZER == "newton_muon" and (step + 1) % NEWTON_REFRESH_STEPS == 0:
            with autocast:
                input_moments = input_second_moments(model, x)
            optimizer.refresh_preconditioners(input_moments)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.time() - t0
        if step > 10:  # the first steps include compilation and warm-up
            training_seconds += dt if step_seconds is None else step_seconds

        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        tokens_per_second = TOTAL_BATCH_SIZE / dt
        mfu = f"{100 * flops_per_token * tokens_per_second / peak:.1f}%" if peak else "n/a"
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {smooth_loss / (1 - 0.9 ** (step + 1)):.6f} | "
              f"lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {tokens_per_second:,.0f} | mfu: {mfu} | "
              f"epoch: {epoch} | remaining: {max(0.0, TIME_BUDGET - training_seconds):.0f}s    ", end="", flush=True)
        if step == 0:  # everything allocated so far lives for the whole run: stop the collector scanning it
            gc.collect()
            gc.freeze()
            gc.disable()
        if step == 10:
            warmup_seconds = time.time() - t_start
        step += 1
        if step > 10 and training_seconds >= TIME_BUDGET:
            break
    print()

    t_eval = time.time()
    with autocast:
        val_bpb = evaluate_bpb(train_model, tokenizer, rows)
    eval_seconds = time.time() - t_eval
    print(f"start-up and first 11 steps (compilation included): {warmup_seconds:.1f}s, evaluation: {eval_seconds:.1f}s")
    peak_mb = peak_memory_mb(device)
    summary = [
        ("val_bpb", f"{val_bpb:.6f}"),
        ("training_seconds", f"{training_seconds:.1f}"),
        ("total_seconds", f"{time.time() - t_start:.1f}"),
        ("peak_vram_mb", f"{peak_mb:.1f}" if peak_mb is not None else "n/a"),
        ("mfu_percent", f"{100 * flops_per_token * TOTAL_BATCH_SIZE * (step - 11) / training_seconds / peak:.2f}"
         if peak else "n/a"),
        ("total_tokens_M", f"{step * TOTAL_BATCH_SIZE / 1e6:.1f}"),
        ("num_steps", step),
        ("num_params_M", f"{num_params / 1e6:.1f}"),
        ("depth", DEPTH),
        ("device", device),
        ("attention", attention),
        ("profile", PROFILE),
        ("dataset", dataset),
        ("precision", "bf16" if dtype == torch.bfloat16 else "fp32"),
        ("time_budget", f"{TIME_BUDGET:g}"),
    ]
    print("---")
    for key, value in summary:
        print(f"{key + ':':<18}{value}")


if __name__ == "__main__":
    main()
