"""
Pretrain a small GPT for a fixed time budget and report val_bpb (validation bits per byte, lower is better).
The agent's file: hyperparameters, model, optimizer, schedules, training loop. Device, precision, attention backend,
the budget and the summary block come from runtime.py, read-only like prepare.py.
Usage: uv run train.py          (after `uv run prepare.py`, or `uv run prepare.py --dataset stdlib` offline)
"""

import math
from dataclasses import dataclass

import runtime  # first: it sets the OpenMP environment before torch loads
import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, PROFILE, Tokenizer, make_dataloader
from runtime import attention_sdpa

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
MATRIX_MOMENTUM_START = 0.85  # momentum of every MATRIX_OPTIMIZER but adamw, ramped linearly from START...
MATRIX_MOMENTUM_END = 0.95    # ...to END...
MATRIX_MOMENTUM_RAMP_STEPS = 300  # ...over this many steps
NORMUON_BETA2 = 0.95          # EMA of NorMuon's second moment
NS_STEPS = 5                  # Polar Express iterations; beyond 5, Newton-Schulz polishing steps
NEWTON_REFRESH_STEPS = 16     # newton_muon: steps between refreshes of its input statistics...
NEWTON_EMA = 0.8              # ...and their EMA decay (zhehangdu/Newton-Muon's record #28 settings)
WEIGHT_DECAY = 0.2            # weight decay of the block matrices (cautious, except adamw), decayed linearly to 0
WARMUP_RATIO = 0.0            # share of the budget spent warming the lr up
WARMDOWN_RATIO = 0.5          # share of the budget at the end spent decaying the lr linearly...
FINAL_LR_FRAC = 0.0           # ...to this fraction of its peak
SEED = 42

# Looped transformer (LoopedGPT below); N_LOOPS = 1 is the plain GPT
N_LOOPS = 1                   # the stack of blocks runs this many times with shared weights
LOOP_CONDITIONING = "gates"   # gates: per-channel gates of each extra loop; loopformer: LoopFormer's time conditioning
LOOP_ROUTING = "none"         # none, or mor: each loop after the first runs only on the tokens a causal router takes
MOR_CAPACITY = (1.0, 0.5)     # mor: most tokens each loop may take, a fraction per loop (the first always 1.0)
MOR_AUX_WEIGHT = 0.1          # mor: weight of (mean router probability - capacity)^2, MoR's token-choice balancing's

# Size and batch per profile (prepare.py picks it). gpu: the reference's, comparable with its val_bpb 0.9979 on an
# H100; cpu-bf16 (AMX): the reference's small-computer config; cpu (also MPS): bench/cpu_defaults.py's best. A
# CPU's masked SDPA computes all T x T scores whatever the window: short windows save nothing there.
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
# Model
# ---------------------------------------------------------------------------

VE_GATE_CHANNELS = 32  # leading channels of x that drive the value-embedding gate
SOFTCAP = 15.0         # logits = SOFTCAP * tanh(logits / SOFTCAP)

@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "SSSL"
    n_loops: int = 1                  # the rest: LoopedGPT's
    loop_conditioning: str = "gates"
    loop_routing: str = "none"
    mor_capacity: tuple = (1.0, 0.5)

def model_config(vocab_size):
    """The config the constants describe: width from DEPTH * ASPECT_RATIO, heads of HEAD_DIM channels."""
    model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head, n_kv_head=n_head,
                     n_embd=model_dim, window_pattern=WINDOW_PATTERN, n_loops=N_LOOPS,
                     loop_conditioning=LOOP_CONDITIONING, loop_routing=LOOP_ROUTING, mor_capacity=MOR_CAPACITY)

def norm(x):
    """RMS norm kept in x's dtype: CUDA autocast would return fp32 (torch >= 2.12) and turn the stream fp32."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)

def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2

def layer_windows(config):
    """Window per layer from the pattern: L = full context, S = half context; the last layer is always full."""
    pattern, size = config.window_pattern.upper(), {"L": config.sequence_len, "S": config.sequence_len // 2}
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"window_pattern {config.window_pattern!r}: use only the letters S and L")
    return [size[pattern[i % len(pattern)]] for i in range(config.n_layer - 1)] + [config.sequence_len]

def rotary_tables(seq_len, head_dim, dtype, device, base=10000):
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)

def apply_rotary(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) of the head dimension by its position's angle. x is (B, T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, attend):
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
        self.attend = attend  # runtime's attention backend: attend(q, k, v, window)

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
        y = self.attend(q, k, v, window)
        return self.c_proj(y.reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())

class Block(nn.Module):
    def __init__(self, config, layer_idx, attend):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, attend)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))

class GPT(nn.Module):
    block_class = Block  # LoopedGPT's blocks differ

    def __init__(self, config, attend=attention_sdpa):
        super().__init__()
        self.config = config
        self.window_sizes = layer_windows(config)
        head_dim = config.n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(self.block_class(config, i, attend) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scale the residual stream per layer
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))    # mix the embedding back in per layer
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
            self.init_block(block, bound)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.wte.to(dtype)
        self.value_embeds.to(dtype)
        self.cos, self.sin = rotary_tables(self.config.sequence_len, d // self.config.n_head, dtype, self.cos.device)

    def init_block(self, block, bound):
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.zeros_(block.attn.c_proj.weight)  # zero projections start every block as the identity
        nn.init.zeros_(block.mlp.c_proj.weight)
        if block.attn.ve_gate is not None:
            nn.init.zeros_(block.attn.ve_gate.weight)

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        x = x0 = norm(self.wte(idx))
        ves = [self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
               for i in range(self.config.n_layer)]
        x, aux_loss = self.trunk(x, x0, ves, self.cos[:, :T], self.sin[:, :T])
        logits = self.lm_head(norm(x)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss + aux_loss if reduction == "mean" else loss  # the training loss; evaluate_bpb's stays pure

    def trunk(self, x, x0, ves, cos, sin):
        """The blocks' output and an auxiliary training loss (none here; MoR's in LoopedGPT)."""
        return self.run_blocks(x, x0, ves, cos, sin, self.window_sizes), 0.0

    def run_blocks(self, x, x0, ves, cos, sin, windows, loop=0, **block_args):
        """One pass through the blocks; `loop` picks the per-layer scalars (a LoopedGPT has some per loop)."""
        for i, block in enumerate(self.blocks):
            j = loop * self.config.n_layer + i
            x = self.resid_lambdas[j] * x + self.x0_lambdas[j] * x0
            x = block(x, ves[i], cos, sin, windows[i], **block_args)
        return x

    def num_flops_per_token(self):
        """Training FLOPs per token for MFU: 6 per weight that multiplies a token (embedding lookups excluded), plus
        attention, 12 per channel per key. The budget counts what runs instead (prepare.step_flops)."""
        width, T = self.config.n_head * (self.config.n_embd // self.config.n_head), self.config.sequence_len
        attention = sum(12 * width * min(w + 1, T) for w in self.window_sizes)
        return 6 * (self.lm_head.weight.numel() + sum(p.numel() for p in self.blocks.parameters())) + attention

    def matrix_layers(self):
        """Every Linear but the head: what MATRIX_OPTIMIZER steps."""
        return [m for m in self.modules() if isinstance(m, nn.Linear) and m is not self.lm_head]

    def adamw_groups(self, lr_scale):
        """(params, lr, betas) of what AdamW steps whatever MATRIX_OPTIMIZER is."""
        return [([self.lm_head.weight], UNEMBEDDING_LR * lr_scale, ADAM_BETAS),
                ([self.wte.weight], EMBEDDING_LR * lr_scale, ADAM_BETAS),
                (list(self.value_embeds.parameters()), EMBEDDING_LR * lr_scale, ADAM_BETAS),
                ([self.resid_lambdas], SCALAR_LR * 0.01, ADAM_BETAS),
                ([self.x0_lambdas], SCALAR_LR, (0.96, 0.95))]

    def setup_optimizer(self, dtype=torch.bfloat16, compile=False):
        """adamw_groups, and a MATRIX_OPTIMIZER group per shape of matrix_layers, whose rule computes in `dtype`."""
        if MATRIX_OPTIMIZER not in MATRIX_RULES and MATRIX_OPTIMIZER != "adamw":
            raise SystemExit(f"MATRIX_OPTIMIZER = {MATRIX_OPTIMIZER!r}: use one of {', '.join(MATRIX_RULES)}, adamw")
        lr_scale = (self.config.n_embd / 768) ** -0.5  # the Adam lrs were tuned at width 768
        adam = dict(kind="adamw", eps=1e-10, weight_decay=0.0)
        groups = [dict(adam, params=params, lr=lr, betas=betas) for params, lr, betas in self.adamw_groups(lr_scale)]
        matrices = [m.weight for m in self.matrix_layers()]
        if MATRIX_OPTIMIZER == "adamw":
            groups.append(dict(adam, params=matrices, lr=MATRIX_LR, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY))
        else:
            for shape in sorted({p.shape for p in matrices}):
                groups.append(dict(kind="matrix", rule=MATRIX_OPTIMIZER, lr=MATRIX_LR, momentum=MATRIX_MOMENTUM_START,
                                   beta2=NORMUON_BETA2, ns_steps=NS_STEPS, weight_decay=WEIGHT_DECAY,
                                   params=[p for p in matrices if p.shape == shape]))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        return MatrixAdamW([g for g in groups if g["params"]], dtype=dtype, compile=compile)

# ---------------------------------------------------------------------------
# Variant: the looped transformer (N_LOOPS > 1), with LoopFormer conditioning and Mixture-of-Recursions routing
# ---------------------------------------------------------------------------

TIME_FEATURES = 32  # loopformer: sinusoid features of t and dt; LoopFormer's 256 barely differ for t in [0, 1)

def check_loops(config):
    if config.loop_conditioning not in ("gates", "loopformer") or config.loop_routing not in ("none", "mor"):
        raise SystemExit(f"LOOP_CONDITIONING = {config.loop_conditioning!r}, LOOP_ROUTING = {config.loop_routing!r}: "
                         "use gates or loopformer, and none or mor")
    c = config.mor_capacity
    if config.loop_routing == "mor" and not (isinstance(c, (tuple, list)) and len(c) == config.n_loops and c[0] == 1
                                             and all(0 < f <= 1 for f in c)):
        raise SystemExit(f"MOR_CAPACITY = {c!r}: give N_LOOPS = {config.n_loops} fractions in (0, 1], the first 1.0")

def sinusoid(t, dim):
    """DiT's timestep features of t (N,): cos and sin of t times dim/2 frequencies from 1 down to 1e-4."""
    angles = t[:, None] * 1e4 ** -(torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    return torch.cat([angles.cos(), angles.sin()], dim=-1)

class Router(nn.Module):
    """Mixture-of-Recursions routing (arXiv 2507.10524) for one loop, causal: a token is taken when its logit is >= 0,
    the loop before took it and fewer than k = ceil(capacity * T) before it were (token-choice under a causal cap)."""
    def __init__(self, n_embd, capacity):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_embd))  # zero: every token starts wanting the loop
        self.capacity = capacity

    def max_tokens(self, T):
        return math.ceil(round(self.capacity * T, 6))  # rounded first: 0.7 * 10 is 7.000000000000001

    def forward(self, x, selected):
        """(taken (B, T), order (B, k): taken tokens by position, then untaken ones as padding, sigmoid(logits))."""
        T, k = x.size(1), self.max_tokens(x.size(1))
        logits = norm(x) @ self.weight
        wants = (logits >= 0) & selected
        taken = wants & (wants.cumsum(dim=1) <= k)
        position = torch.arange(T, device=x.device)
        order = torch.where(taken, position, position + T).argsort(dim=1)[:, :k]
        return taken, order, torch.sigmoid(logits)

class LoopedBlock(Block):
    """gates: per-channel gates of both branches from the loop's embedding (LoopFormer, arXiv 2602.11451, minimally);
    loopformer: its adaLN-Zero gates and input scales from the loop's time."""
    def __init__(self, config, layer_idx, attend):
        super().__init__(config, layer_idx, attend)
        loopformer = config.loop_conditioning == "loopformer"
        self.loop_gate = nn.Linear(config.n_embd, (4 if loopformer else 2) * config.n_embd, bias=loopformer)

    def forward(self, x, ve, cos, sin, window, condition=None):
        gates = (1.0, 1.0) if condition is None else self.loop_gate(condition).split(x.size(-1))
        g_attn, g_mlp, s_attn, s_mlp = (*gates, 0.0, 0.0)[:4]  # scales are loopformer's only (0 otherwise)
        x = x + g_attn * self.attn(norm(x) * (1 + s_attn), ve, cos, sin, window)
        return x + g_mlp * self.mlp(norm(x) * (1 + s_mlp))

class LoopedGPT(GPT):
    """The blocks run N_LOOPS times with shared weights; each layer gets its own scalars on every loop."""
    block_class = LoopedBlock
    def __init__(self, config, attend=attention_sdpa):
        check_loops(config)
        super().__init__(config, attend)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer * config.n_loops))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer * config.n_loops))
        self.loopformer = config.loop_conditioning == "loopformer"
        self.loop_embeds = nn.ParameterList(torch.zeros(config.n_embd) for _ in range(config.n_loops - 1)
                                            if not self.loopformer)
        # loopformer: embedders of the loop's time t and step dt (DiT's: sinusoid features, Linear, SiLU, Linear)
        self.time_embeds = nn.ModuleList(nn.Sequential(nn.Linear(TIME_FEATURES, config.n_embd), nn.SiLU(),
                                                       nn.Linear(config.n_embd, config.n_embd))
                                         for _ in range(2 if self.loopformer else 0))
        self.routers = nn.ModuleList(Router(config.n_embd, c) for c in config.mor_capacity[1:]
                                     if config.loop_routing == "mor")

    @torch.no_grad()
    def init_weights(self, dtype):
        super().init_weights(dtype)
        self.x0_lambdas[self.config.n_layer:] = 0  # with zero gates, every extra loop starts as the identity
        for loop_embed in self.loop_embeds:  # after the shared weights, so they draw what N_LOOPS = 1 draws
            nn.init.normal_(loop_embed, std=1.0)
        for linear in (m for m in self.time_embeds.modules() if isinstance(m, nn.Linear)):
            nn.init.uniform_(linear.weight, -(3 / linear.in_features) ** 0.5, (3 / linear.in_features) ** 0.5)
            nn.init.zeros_(linear.bias)
        for router in self.routers:
            nn.init.zeros_(router.weight)

    def init_block(self, block, bound):
        super().init_block(block, bound)
        # LoopFormer's zero gates start every block as the identity already, and a zero gate on a zero projection
        # is a saddle no gradient leaves: there the projections draw, as in its paper
        if self.loopformer:
            nn.init.uniform_(block.attn.c_proj.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_proj.weight, -bound, bound)
        for p in block.loop_gate.parameters():  # weight, and bias under loopformer
            nn.init.zeros_(p)

    def trunk(self, x, x0, ves, cos, sin):
        """Every loop; rotary, value embeddings and x0 are the same in each. The auxiliary loss: MoR's balancing."""
        taken, aux_loss = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), 0.0
        for loop, condition in enumerate(self.loop_conditions()):
            if loop == 0 or not self.routers:
                x = self.run_blocks(x, x0, ves, cos, sin, self.window_sizes, loop, condition=condition)
            else:
                x, taken, capacity_miss = self.routed_loop(x, x0, ves, loop, condition, taken)
                aux_loss = aux_loss + MOR_AUX_WEIGHT * capacity_miss
        return x, aux_loss

    def loop_conditions(self):
        """Per loop, the vector the blocks' loop_gate reads (None: ungated). gates: the loop's embedding from the second
        loop on; loopformer: SiLU(TimeEmb(t) + DtEmb(dt)), t = loop / N_LOOPS, dt = 1 / N_LOOPS (uniform trajectory)."""
        if not self.loopformer:
            return [None] + [norm(loop_embed) for loop_embed in self.loop_embeds]
        n = self.config.n_loops
        t = torch.arange(n, device=self.cos.device) / n
        time_embed, step_embed = self.time_embeds
        c = time_embed(sinusoid(t, TIME_FEATURES)) + step_embed(sinusoid(torch.full_like(t, 1 / n), TIME_FEATURES))
        return list(F.silu(c))

    def routed_loop(self, x, x0, ves, loop, condition, selected):
        """A MoR loop: the blocks run on the k rows its router gathers (own position, value embedding and x0, causal
        by position); only taken rows are written back, untaken ones pass bit for bit. Returns (x, taken, miss)."""
        router = self.routers[loop - 1]
        taken, order, probability = router(x, selected)
        def gather(t):
            return t.gather(1, order[..., None].expand(-1, -1, t.size(-1)))
        rows, k = gather(x), order.size(1)
        causal = torch.ones(k, k, dtype=torch.bool, device=x.device).tril()  # padding slots follow all taken ones
        offset = order[:, :, None] - order[:, None, :]
        masks = {w: (causal & (offset <= w))[:, None] for w in set(self.window_sizes)}
        update = self.run_blocks(rows, gather(x0), [ve if ve is None else gather(ve) for ve in ves],
                                 self.cos[0, order], self.sin[0, order], [masks[w] for w in self.window_sizes],
                                 loop, condition=condition)
        p = gather(probability[..., None])
        update = update + (update - rows) * (p - p.detach())  # straight-through: value exact, gradient to the router
        kept = torch.where(taken.gather(1, order)[..., None], update, rows)  # padding slots: their own old state
        x = x.scatter(1, order[..., None].expand_as(rows), kept)
        return x, taken, (probability.float().mean() - router.capacity) ** 2

    def num_flops_per_token(self):
        """The blocks count once per loop, their gates not at all; a routed loop counts its router on every token,
        the blocks on k of T rows and attention over all k of them (masked SDPA)."""
        width, T = self.config.n_head * (self.config.n_embd // self.config.n_head), self.config.sequence_len
        matmuls = 6 * sum(p.numel() for name, p in self.blocks.named_parameters() if "loop_gate" not in name)
        attention = sum(12 * width * min(w + 1, T) for w in self.window_sizes)
        flops = 6 * self.lm_head.weight.numel() + (self.config.n_loops - len(self.routers)) * (matmuls + attention)
        for router in self.routers:
            k = router.max_tokens(T)
            flops += 6 * self.config.n_embd + k / T * (matmuls + 12 * width * k * self.config.n_layer)
        return flops

    def adamw_groups(self, lr_scale):
        return super().adamw_groups(lr_scale) + [
            (list(self.loop_embeds), EMBEDDING_LR * lr_scale, ADAM_BETAS),
            ([r.weight for r in self.routers], UNEMBEDDING_LR * lr_scale, ADAM_BETAS),  # one-logit heads
            # LoopFormer's biases, at the lr of the weights they sit beside
            ([m.bias for m in self.matrix_layers() if m.bias is not None], MATRIX_LR, ADAM_BETAS)]

# ---------------------------------------------------------------------------
# Optimizer: AdamW, and a table of update rules for the block matrices (Muon and its variants)
# ---------------------------------------------------------------------------

# Polar Express quintics (a, b, c), one per iteration (arXiv 2505.16932; modded-nanogpt's and nanochat's set)
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
# past those 5, a quintic with p(1) = 1, p'(1) = 0 repeats, as the paper's Algorithm 1 does past its own list
POLISH_COEFFS = (1.875, -1.25, 0.375)

def polar_express(G, ns_steps=NS_STEPS, dtype=torch.bfloat16):
    """U V^T of G = U S V^T, approximately (batched, in `dtype`): each quintic maps s to a*s + b*s^3 + c*s^5."""
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
def muon_rule(grads, params, momentum_buffer, momentum, ns_steps, dtype, **_):
    O = polar_express(nesterov_(grads, momentum_buffer, momentum), ns_steps, dtype)
    return O.to(params.dtype), shape_factor(params)

def normuon_rule(grads, params, momentum_buffer, second_moment, momentum, beta2, ns_steps, dtype, **_):
    O = polar_express(nesterov_(grads, momentum_buffer, momentum), ns_steps, dtype)
    return normuon(O.to(params.dtype), second_moment, beta2), shape_factor(params)

def adamuon_rule(grads, params, momentum_buffer, second_moment, momentum, ns_steps, dtype, **_):
    """AdaMuon (arXiv 2507.11005; Chongjie-Si/AdaMuon at 369f0b3): orthogonalised sign of the Nesterov direction over
    the EMA of its element-wise square (beta2 = momentum, no bias correction, float32), rescaled to an RMS of 0.2."""
    O = polar_express(nesterov_(grads, momentum_buffer, momentum).sign(), ns_steps, dtype).float()
    second_moment.lerp_(O.square(), 1 - momentum)
    U = O / (second_moment.sqrt() + 1e-8)
    U = U * (0.2 * U[0].numel() ** 0.5 / (U.norm(dim=(-2, -1), keepdim=True) + 1e-8))
    return U.to(params.dtype), 1.0

def mano_rule(grads, params, momentum_buffer, momentum, odd_step, **_):
    """Mano (arXiv 2601.23000 v2, its mano_v2.py): Nesterov heavy-ball momentum projected onto the oblique manifold's
    tangent space at W along columns on even steps, rows on odd ones, and normalised along that axis."""
    dim = -1 if odd_step else -2  # -2: each column is one vector
    momentum_buffer.mul_(momentum).add_(grads)
    D = grads + momentum * momentum_buffer
    T = D - (D * params).sum(dim=dim, keepdim=True) * params
    return (0.2 * params.size(dim) ** 0.5) * T / (T.norm(dim=dim, keepdim=True) + 1e-8), 1.0

def newton_muon_rule(grads, params, preconditioner=None, **muon_args):
    """Newton-Muon (arXiv 2604.01472): Muon on the gradient times its inverse input second moment, if refreshed."""
    return muon_rule(grads if preconditioner is None else grads @ preconditioner.to(grads.dtype), params, **muon_args)

def matrix_buffers(rule, stacked):
    """The state a rule keeps for a stack of (rows, cols) matrices."""
    buffers = dict(momentum_buffer=torch.zeros_like(stacked))
    rows, cols = stacked.shape[-2:]
    if rule == "normuon":  # one second moment per index of the larger side
        buffers["second_moment"] = stacked.new_zeros(len(stacked), *((rows, 1) if rows >= cols else (1, cols)))
    if rule == "adamuon":
        buffers["second_moment"] = torch.zeros_like(stacked, dtype=torch.float32)
    return buffers

MATRIX_RULES = {"normuon": normuon_rule, "muon": muon_rule, "adamuon": adamuon_rule, "mano": mano_rule,
                "newton_muon": newton_muon_rule}

def cautious_update_(params, update, lr, weight_decay):
    """p -= lr * (u + wd * p), decaying only where u and p share a sign (cautious weight decay, arXiv 2510.12402)."""
    decay = (update * params >= 0).to(params.dtype)
    params.sub_(lr * (update + weight_decay * params * decay))

def matrix_step(rule, params, grads, buffers, momentum, lr, weight_decay, beta2, ns_steps, dtype, odd_step):
    """One step of MATRIX_RULES[rule] on a stack of same-shape matrices, updated in place."""
    update, lr_factor = MATRIX_RULES[rule](grads, params, **buffers, momentum=momentum, beta2=beta2,
                                           ns_steps=ns_steps, dtype=dtype, odd_step=odd_step)
    cautious_update_(params, update, lr * lr_factor, weight_decay)

def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """Decoupled AdamW (Loshchilov & Hutter), same algebra as torch.optim.AdamW; updated in place."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps
    param.sub_(lr / (1 - beta1 ** step) * exp_avg / denom)

class MatrixAdamW(torch.optim.Optimizer):
    """AdamW for groups of kind "adamw"; MATRIX_RULES[rule] for kind "matrix", params of one shape as one stack."""

    def __init__(self, param_groups, dtype=torch.bfloat16, compile=False):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
            params = group["params"]  # every buffer now: memory measured before step 0 is what training needs
            if group["kind"] == "matrix":
                self.state[params[0]] = dict(step=0, buffers=matrix_buffers(group["rule"], torch.stack(params)))
            else:
                for p in params:
                    self.state[p] = dict(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        self.dtype = dtype
        # dynamic shapes: one graph serves every parameter shape (AdamW sees them flattened), few graphs in all
        maybe_compile = (lambda f: torch.compile(f, dynamic=True, fullgraph=True)) if compile else (lambda f: f)
        self._adamw_step, self._matrix_step = maybe_compile(adamw_step), maybe_compile(matrix_step)
        # scalars the schedules move travel as 0-D tensors, so compiled steps never recompile
        self._scalars = {name: torch.tensor(0.0) for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "mom")}

    def _scalar(self, name, value):
        return self._scalars[name].fill_(value)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (self.step_adamw if group["kind"] == "adamw" else self.step_matrix)(group)

    def step_adamw(self, group):
        for p in (p for p in group["params"] if p.grad is not None):
            state = self.state[p]
            state["step"] += 1
            self._adamw_step(p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                             self._scalar("step", state["step"]), self._scalar("lr", group["lr"]),
                             self._scalar("beta1", group["betas"][0]), self._scalar("beta2", group["betas"][1]),
                             self._scalar("eps", group["eps"]), self._scalar("wd", group["weight_decay"]))

    def step_matrix(self, group):
        params = group["params"]
        stacked = torch.stack(params)
        grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        state = self.state[params[0]]
        self._matrix_step(group["rule"], stacked, grads, state["buffers"], self._scalar("mom", group["momentum"]),
                          self._scalar("lr", group["lr"]), self._scalar("wd", group["weight_decay"]),
                          self._scalar("beta2", group["beta2"]), group["ns_steps"], self.dtype,
                          state["step"] % 2 == 1)
        state["step"] += 1
        torch._foreach_copy_(params, list(stacked.unbind(0)))

# Variant: Newton-Muon's preconditioners, refreshed from the layers' input statistics every NEWTON_REFRESH_STEPS

@torch.no_grad()
def input_second_moments(model, idx):
    """{weight: X^T X / N of its input} over one forward of idx, averaged over loops (a routed one: taken rows only)."""
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
              for router in getattr(model, "routers", [])]  # out: taken, order, probability
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return {weight: total / calls for weight, (total, calls) in sums.items()}

@torch.no_grad()
def refresh_newton_muon(optimizer, input_moments):
    """Fold input second moments into their EMA K; store (K + 0.2 tr(K) / n)^-1 in float32 (I if not pos. def.)."""
    for group in optimizer.param_groups:
        if group.get("rule") != "newton_muon":
            continue
        state = optimizer.state[group["params"][0]]
        moments = torch.stack([input_moments[p] for p in group["params"]])
        eye = torch.eye(moments.size(-1), device=moments.device)
        K = state.setdefault("input_moment", 1e-3 * eye.expand_as(moments).clone())  # the EMA starts at 1e-3 I
        K.lerp_(moments, 1 - NEWTON_EMA)
        ridge = 0.2 * K.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-8
        L, info = torch.linalg.cholesky_ex(K + ridge[:, None, None] * eye)
        state["buffers"]["preconditioner"] = torch.where((info == 0)[:, None, None], torch.cholesky_inverse(L), eye)

# ---------------------------------------------------------------------------
# Training: schedules driven by progress = training time / budget, then the loop
# ---------------------------------------------------------------------------

def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    remaining = (1 - progress) / WARMDOWN_RATIO
    return remaining + (1 - remaining) * FINAL_LR_FRAC

def matrix_momentum(step):
    frac = min(step / MATRIX_MOMENTUM_RAMP_STEPS, 1.0) if MATRIX_MOMENTUM_RAMP_STEPS > 0 else 1.0
    return (1 - frac) * MATRIX_MOMENTUM_START + frac * MATRIX_MOMENTUM_END

def update_schedules(optimizer, step, progress):
    """Move every group's lr, weight decay and momentum to where the schedules put them; returns the lr multiplier."""
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        group["weight_decay"] = group["initial_weight_decay"] * (1 - progress)  # linearly to 0
        if group["kind"] == "matrix":
            group["momentum"] = matrix_momentum(step)
    return lrm

def main():
    rt = runtime.setup()  # prints device, precision, attention, compile, budget and profile with their reasons
    tokenizer = Tokenizer.from_directory()
    torch.manual_seed(SEED)
    config = model_config(tokenizer.get_vocab_size())
    model = rt.build_model(LoopedGPT if N_LOOPS > 1 else GPT, config, layer_windows(config))
    num_params, flops_per_token = sum(p.numel() for p in model.parameters()), model.num_flops_per_token()
    runtime.describe_model(rt, config, num_params, flops_per_token)
    optimizer = model.setup_optimizer(dtype=rt.dtype, compile=rt.compile_optimizer)  # its state exists from here
    train_model = torch.compile(model, dynamic=False) if rt.compile_model else model
    rows, grad_accum_steps = runtime.fit_micro_batch(rt, train_model, model, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE)
    train_loader = make_dataloader(tokenizer, rows, MAX_SEQ_LEN, "train", device=rt.device)
    x, y, epoch = next(train_loader)
    budget = runtime.Budget(rt, model, x, y, rows * grad_accum_steps, TOTAL_BATCH_SIZE, flops_per_token)

    step, done = 0, False
    while not done:
        budget.start_step()
        for _ in range(grad_accum_steps):
            with rt.autocast():
                loss = train_model(x, y)
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        lrm = update_schedules(optimizer, step, budget.progress)
        if MATRIX_OPTIMIZER == "newton_muon" and (step + 1) % NEWTON_REFRESH_STEPS == 0:
            with rt.autocast():
                refresh_newton_muon(optimizer, input_second_moments(model, x))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        done = budget.end_step(step, loss.item(), lrm, epoch)  # charges the step, prints progress, stops a NaN
        step += 1

    runtime.evaluate_and_summarize(rt, budget, train_model, tokenizer, rows, num_params, DEPTH)

if __name__ == "__main__":
    main()
