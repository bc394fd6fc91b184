"""
The runtime train.py calls and never changes: device, precision, compile and attention choices (each printed at
start-up with its reason), the micro-batch fit, the time budget's accounting and the summary block. What decides
the agent's number lives here and in prepare.py, out of the file the agent edits.

Usage: uv run python -c "import runtime; runtime.setup()"   (prints every choice for this machine, trains nothing)
"""

import gc
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

# OpenMP threads waiting at a barrier spin 1,000 rounds before sleeping, not libgomp's default 300,000: 2% slower
# on a quiet CPU, but a busy neighbour no longer costs 41% more CPU time per step (bench/noise.py --load)
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # read when torch loads libgomp

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import (CPU_FLOPS, MAX_SEQ_LEN, PROFILE, PROFILE_REASON, TIME_BUDGET, cpuinfo_field, dataset_label,
                     evaluate_bpb, step_flops, tcp_problem)

# ---------------------------------------------------------------------------
# Device, precision, compilation
# ---------------------------------------------------------------------------

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
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


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

# ---------------------------------------------------------------------------
# Attention: one signature, three backends
# ---------------------------------------------------------------------------
# attend(q, k, v, window): q (B, T, H, D), k and v (B, T, Hkv, D) with H a multiple of Hkv; causal, and query t
# sees keys t-window..t (FlashAttention-3's window_size=(window, 0)); window >= T-1 is full context. Every backend
# also takes a boolean mask (B or 1, 1, T, T; True = attend) as the window, which SDPA computes.

ATTENTION_BACKENDS = ("fa3", "flex", "sdpa")


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


def attention_fa3(fa3):
    def attend(q, k, v, window):
        if isinstance(window, torch.Tensor):
            return attention_sdpa(q, k, v, window)
        y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp
    return attend


def attention_flex(seq_len, windows, device):
    """Flex with its block masks built now, outside any compiled region, one per window; compiled on CUDA (eager
    Flex is an unfused O(T^2) fallback, and torch has no Flex backward on CPU: there it runs forward only)."""
    flex = torch.compile(flex_attention, dynamic=False) if torch.device(device).type == "cuda" else flex_attention
    masks = {w: create_block_mask(sliding_causal(w), None, None, seq_len, seq_len, device=device)
             for w in set(windows)}

    def attend(q, k, v, window):
        if isinstance(window, torch.Tensor):
            return attention_sdpa(q, k, v, window)
        if q.size(1) != seq_len or window not in masks:
            raise ValueError(f"flex attention was built for T = {seq_len} and windows {sorted(masks)}, "
                             f"not T = {q.size(1)} and window {window}: pass them to Runtime.attention")
        y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[window],
                 enable_gqa=q.size(2) != k.size(2))
        return y.transpose(1, 2)
    return attend


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
    return tcp_problem(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", timeout) is None


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


def fa3_problem(fa3):
    """None when the loaded FA3 runs and matches SDPA on a small bf16 input with a window, else what went wrong:
    a build can load and still fail at its first call."""
    try:
        q, k, v = (torch.randn(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        error = (attention_fa3(fa3)(q, k, v, 127) - attention_sdpa(q, k, v, 127)).abs().max().item()
    except Exception as e:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    return None if error < 0.05 else f"its output differs from SDPA's by {error:.3g}"


def pick_attention(device):
    """(backend, the loaded FA3 module or None, why)."""
    if device != "cuda":
        return "sdpa", None, f"{device}: SDPA (FlashAttention-3 and compiled FlexAttention need CUDA)"
    fa3, why = load_fa3()
    problem = fa3_problem(fa3) if fa3 is not None else None
    if fa3 is not None and problem is None:
        return "fa3", fa3, why
    if problem:
        why = f"{why} failed its check: {problem}"
    return "flex", None, f"FlexAttention, compiled (FlashAttention-3 unavailable: {why})"

# ---------------------------------------------------------------------------
# Set-up: every choice made once, printed with its reason
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


def peak_flops(device):
    """This device's dense bf16 peak, or None when it is not in BF16_PEAK_FLOPS (MFU is then not reported)."""
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return next((flops for pattern, flops in BF16_PEAK_FLOPS if name and re.search(pattern, name)), None)


def budget_unit(device):
    """What the time budget counts. An accelerator is not shared, so wall time. A CPU is, and its speed also drifts
    between runs on a VM host (quiet 300 s runs took 191-209 steps): there the budget counts work, every step
    costing its FLOPs (prepare.step_flops) at CPU_FLOPS, so the steps depend on the model alone."""
    if device == "cpu":
        return f"work, each step's FLOPs counted at {CPU_FLOPS / 1e9:g} GFLOP/s (prepare.py's CPU_FLOPS)"
    return "wall clock"


@dataclass
class Runtime:
    """The set-up's choices, made by setup()."""
    dataset: str
    device: str
    dtype: torch.dtype
    attention_backend: str
    compile_model: bool
    compile_optimizer: bool
    peak_flops: float = None  # dense bf16 FLOP/s; None: MFU not reported
    fa3: object = None        # the loaded FlashAttention-3 module when attention_backend is fa3
    t_start: float = 0.0      # when set-up began: total_seconds counts from here

    def autocast(self):
        """The context every forward runs in: bf16 autocast when the compute dtype is bf16."""
        return torch.autocast(self.device, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext()

    def attention(self, seq_len, windows):
        """attend(q, k, v, window) on the chosen backend (one of ATTENTION_BACKENDS), for seq_len and these windows."""
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {self.attention_backend!r}: use one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.attention_backend == "fa3":
            return attention_fa3(self.fa3)
        if self.attention_backend == "flex":
            return attention_flex(seq_len, windows, self.device)
        return attention_sdpa

    def build_model(self, model_class, config, windows):
        """model_class(config, attend) on the meta device (no memory, no random draws), then moved where it trains
        and initialised there by its init_weights(dtype)."""
        attend = self.attention(config.sequence_len, windows)
        with torch.device("meta"):
            model = model_class(config, attend)
        model.to_empty(device=self.device)
        model.init_weights(self.dtype)
        return model

    def mfu(self, flops_per_second):
        return f"{100 * flops_per_second / self.peak_flops:.1f}%" if self.peak_flops else "n/a"


def setup():
    """Make every set-up decision and print it with its reason: the first lines of a run."""
    t_start = time.time()
    dataset = dataset_label()  # exits with the prepare.py command to run when nothing is prepared
    device, why = pick_device()
    print(f"device:    {device} ({why})")
    dtype, why = pick_dtype(device)
    print(f"precision: {why}")
    attention, fa3, why = pick_attention(device)
    print(f"attention: {attention} ({why})")
    compile_model, compile_optimizer, why = pick_compile(device)
    print(f"compile:   {why}")
    print(f"budget:    {TIME_BUDGET:g}s of {budget_unit(device)}")
    print(f"profile:   {PROFILE} ({PROFILE_REASON}), dataset {dataset}, context {MAX_SEQ_LEN}")
    return Runtime(dataset, device, dtype, attention, compile_model, compile_optimizer, peak_flops(device), fa3,
                   t_start)


def describe_model(rt, config, num_params, flops_per_token):
    print(f"model:     {config}")
    print(f"params:    {num_params / 1e6:.2f}M, {flops_per_token / 1e6:.1f} MFLOP/token, MFU "
          + (f"against {rt.peak_flops / 1e12:.1f} TFLOP/s bf16" if rt.peak_flops else
             "n/a (no known bf16 peak for this device)"))

# ---------------------------------------------------------------------------
# Micro-batch: the most rows per forward and backward that fit
# ---------------------------------------------------------------------------

def cuda_free_gb():
    """GPU memory this process may still take: free memory, capped by set_per_process_memory_fraction."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return min(free, fraction * total - torch.cuda.memory_reserved()) / 2**30


def pick_micro_batch(device, try_rows, device_batch_size, total_batch_size, seq_len):
    """(rows per forward and backward, why). device_batch_size, except on CUDA where it does not fit in memory:
    then the largest power of two below it for which try_rows(rows), a forward and backward, does not run out of
    memory. Gradient accumulation makes up total_batch_size either way, so every card takes the same steps."""
    if device != "cuda":
        return device_batch_size, "DEVICE_BATCH_SIZE"
    free_gb = cuda_free_gb()
    smaller = [2**i for i in reversed(range(device_batch_size.bit_length())) if 2**i < device_batch_size]
    too_big = []
    for rows in [device_batch_size] + [r for r in smaller if total_batch_size % (r * seq_len) == 0]:
        try:
            try_rows(rows)
        except torch.OutOfMemoryError:
            too_big.append(rows)
            continue
        finally:
            torch.cuda.empty_cache()
        return rows, (f"{too_big[0]} rows do not fit in {free_gb:.1f} GB free" if too_big else
                      f"DEVICE_BATCH_SIZE fits in {free_gb:.1f} GB free")
    raise SystemExit(f"not even one row of {seq_len} tokens fits in {free_gb:.1f} GB of GPU memory: make the "
                     "model smaller (DEPTH, ASPECT_RATIO, N_LOOPS)")


def fit_micro_batch(rt, train_model, model, device_batch_size, total_batch_size, seq_len=MAX_SEQ_LEN):
    """(rows per forward and backward, gradient accumulation steps), printed with the reason. Call it once the
    optimizer's state exists, so the fit leaves room for it."""
    if total_batch_size % (device_batch_size * seq_len):
        raise SystemExit(f"TOTAL_BATCH_SIZE {total_batch_size} is not a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
                         f"= {device_batch_size} * {seq_len} = {device_batch_size * seq_len}: change one of them")

    def try_rows(rows):  # one forward and backward at the real shapes, gradients cleared after
        x = torch.zeros(rows, seq_len, dtype=torch.long, device=rt.device)
        try:
            with rt.autocast():
                train_model(x, x).backward()
        finally:
            model.zero_grad(set_to_none=True)

    rows, why = pick_micro_batch(rt.device, try_rows, device_batch_size, total_batch_size, seq_len)
    grad_accum_steps = total_batch_size // (rows * seq_len)
    print(f"batch:     {total_batch_size:,} tokens/step = {grad_accum_steps} x {rows} x {seq_len} ({why})")
    return rows, grad_accum_steps

# ---------------------------------------------------------------------------
# The time budget
# ---------------------------------------------------------------------------

class Budget:
    """TIME_BUDGET seconds of training: of wall time on an accelerator, of work on a CPU, where each step costs
    its FLOPs (prepare.step_flops, counted once on one row) at CPU_FLOPS. The first FREE_STEPS are not charged:
    they include compilation and warm-up."""
    FREE_STEPS = 11

    def __init__(self, rt, model, x, y, rows_per_step, tokens_per_step, flops_per_token):
        self.rt, self.tokens_per_step, self.flops_per_token = rt, tokens_per_step, flops_per_token
        self.seconds, self.steps, self.smooth_loss = 0.0, 0, 0.0  # charged seconds, steps run
        self.step_seconds = None  # what a step costs; None: its wall time
        if rt.device == "cpu":
            with rt.autocast():  # FLOPs are per row (all but the loop gates' few): one row is counted, in little memory
                flops = step_flops(model, x[:1], y[:1]) * rows_per_step
            self.step_seconds = flops / CPU_FLOPS
            print(f"work:      {flops / 1e9:.1f} GFLOP/step = {self.step_seconds:.3f}s of the budget: "
                  f"{self.FREE_STEPS + math.ceil(TIME_BUDGET / self.step_seconds)} steps")

    @property
    def progress(self):
        return min(self.seconds / TIME_BUDGET, 1.0)

    def start_step(self):
        synchronize(self.rt.device)
        self.t0 = time.perf_counter()

    def end_step(self, step, loss, lrm, epoch):
        """Charge step `step` and print its progress line; True once the budget is spent. `loss`: the step's last
        micro-batch's; a run whose loss is not finite or over 100 stops here with FAIL."""
        if not math.isfinite(loss) or loss > 100:
            print(f"\nFAIL: training loss {loss} at step {step}")
            sys.exit(1)
        synchronize(self.rt.device)
        dt = max(time.perf_counter() - self.t0, 1e-9)  # a clock that did not tick divides nothing by zero
        progress = self.progress
        if step >= self.FREE_STEPS:
            self.seconds += dt if self.step_seconds is None else self.step_seconds
        self.steps = step + 1
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        tokens_per_second = self.tokens_per_step / dt
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {self.smooth_loss / (1 - 0.9 ** (step + 1)):.6f} | "
              f"lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {tokens_per_second:,.0f} | "
              f"mfu: {self.rt.mfu(self.flops_per_token * tokens_per_second)} | epoch: {epoch} | "
              f"remaining: {max(0.0, TIME_BUDGET - self.seconds):.0f}s    ", end="", flush=True)
        if step == 0:  # everything allocated so far lives for the whole run: stop the collector scanning it
            gc.collect()
            gc.freeze()
            gc.disable()
        if self.steps == self.FREE_STEPS:
            self.warmup_seconds = time.time() - self.rt.t_start
        done = self.steps >= self.FREE_STEPS and self.seconds >= TIME_BUDGET
        if done:
            print()
        return done

# ---------------------------------------------------------------------------
# The summary block: the lines program.md, campaign.py and the hub read
# ---------------------------------------------------------------------------

def peak_memory_mb(device):
    """Peak memory in MiB, or None on MPS: Metal reports only the memory in use now, no peak."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def evaluate_and_summarize(rt, budget, model, tokenizer, batch_size, num_params, depth):
    """val_bpb of the trained model by prepare.evaluate_bpb, then the summary block."""
    t_eval = time.time()
    with rt.autocast():
        val_bpb = evaluate_bpb(model, tokenizer, batch_size)
    print_summary(rt, budget, val_bpb, time.time() - t_eval, num_params, depth)


def print_summary(rt, budget, val_bpb, eval_seconds, num_params, depth):
    print(f"start-up and first {budget.FREE_STEPS} steps (compilation included): {budget.warmup_seconds:.1f}s, "
          f"evaluation: {eval_seconds:.1f}s")
    peak_mb = peak_memory_mb(rt.device)
    charged_flops = budget.flops_per_token * budget.tokens_per_step * (budget.steps - budget.FREE_STEPS)
    summary = [
        ("val_bpb", f"{val_bpb:.6f}"),
        ("training_seconds", f"{budget.seconds:.1f}"),
        ("total_seconds", f"{time.time() - rt.t_start:.1f}"),
        ("peak_vram_mb", f"{peak_mb:.1f}" if peak_mb is not None else "n/a"),
        ("mfu_percent", f"{100 * charged_flops / budget.seconds / rt.peak_flops:.2f}" if rt.peak_flops else "n/a"),
        ("total_tokens_M", f"{budget.steps * budget.tokens_per_step / 1e6:.1f}"),
        ("num_steps", budget.steps),
        ("num_params_M", f"{num_params / 1e6:.1f}"),
        ("depth", depth),
        ("device", rt.device),
        ("attention", rt.attention_backend),
        ("profile", PROFILE),
        ("dataset", rt.dataset),
        ("precision", "bf16" if rt.dtype == torch.bfloat16 else "fp32"),
        ("time_budget", f"{TIME_BUDGET:g}"),
    ]
    print("---")
    for key, value in summary:
        print(f"{key + ':':<18}{value}")
