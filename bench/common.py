"""Shared pieces of the nanoalign GPU benchmarks: model shapes, random-weight models, timing, memory, MFU.

Not a script. Every bench_*.py next to it imports this module (the bench dir is on sys.path when a script in it
runs) and prints one `RESULT {json}` line per case, like the peer's shared/bench/peer_bench.py, so both logs can
be grepped the same way. `--tiny` swaps in a small config and small shapes so a bench runs on a CPU in seconds:
that is a smoke test of the code path, never a performance figure.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the device machine gets the working tree, not an installed nanoalign
    sys.path.insert(0, str(ROOT))

from nanoalign.model import CausalLM, ModelConfig, flops_per_token, matmul_params  # noqa: E402

# Qwen2.5-0.5B, exactly the peer's dict (shared/bench/peer_bench.py QWEN05) so both sides build the same shapes.
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              hidden_act="silu", bos_token_id=151643, eos_token_id=151643)
# Qwen2.5-1.5B (config.json of Qwen/Qwen2.5-1.5B)
QWEN15 = dict(QWEN05, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, max_position_embeddings=131072)
# Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B; Skywork-Reward-V2-Qwen3-0.6B has the same decoder)
QWEN3_06 = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                hidden_act="silu", bos_token_id=151643, eos_token_id=151645)
# --tiny: same code paths (GQA, tied embeddings, q/k/v bias), CPU-sized
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, hidden_act="silu", bos_token_id=1000, eos_token_id=1000)
TINY_QWEN3 = dict(TINY, head_dim=32, attention_bias=False)
PAD_ID = 151643  # <|endoftext|>, Qwen's pad; in --tiny configs the pad is vocab_size - 24 (see pad_id)

# Length distributions of the real workloads, in Qwen2.5 tokens, as histograms: [(low, high, share)], a length
# drawn uniformly within its bin. ASSUMED SHAPES: no published token-length histogram of these datasets was
# found. What is published and what they are fitted to:
# - smol-smoltalk (HuggingFaceTB/smol-smoltalk, dataset card): train 460,341 conversations, 1,811,694,118 bytes
#   (~3.9 kB a row, role strings and the `source` column included) -> ~900 tokens a conversation at ~4 bytes
#   a token, ~0.4 B tokens an epoch. Shape assumed: long-tailed (Magpie-style chats: many short, some > 2k).
SMOLTALK_HIST = [(32, 128, 0.06), (128, 256, 0.10), (256, 512, 0.20), (512, 1024, 0.30), (1024, 1536, 0.17),
                 (1536, 2048, 0.10), (2048, 4096, 0.07)]  # mean ~ 1,000; 7% above 2,048 (dropped at --max-len)
# - UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized, train_prefs: 61,135 pairs). Shape and means
#   assumed (prompt ~ 150 tokens, responses ~ 300), cut like train_dpo.py's defaults.
UF_PROMPT_HIST = [(8, 64, 0.35), (64, 128, 0.25), (128, 256, 0.20), (256, 512, 0.15), (512, 1024, 0.05)]
UF_RESPONSE_HIST = [(8, 128, 0.20), (128, 256, 0.25), (256, 512, 0.35), (512, 1024, 0.20)]


def sample_lengths(hist, n, seed=0, cap=None):
    """n lengths drawn from a histogram [(low, high, share)]; `cap` clips (as truncation would)."""
    import random
    rng = random.Random(seed)
    bins = rng.choices(hist, weights=[w for _, _, w in hist], k=n)
    return [min(rng.randrange(lo, hi), cap or hi) for lo, hi, _ in bins]


# Peak dense bf16 tensor-core FLOP/s (no sparsity). First match of the GPU name wins, so specific names go first.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12),
    ("4090", 165e12),  # GeForce RTX 4090, bf16 with fp32 accumulate (what PyTorch's matmuls use)
]


def hf_config(shapes: dict, model_type="qwen2") -> dict:
    return dict(shapes, model_type=model_type)


def model_config(shapes: dict, model_type="qwen2") -> ModelConfig:
    return ModelConfig.from_hf(hf_config(shapes, model_type), source="bench")


def pad_id(config: ModelConfig) -> int:
    return PAD_ID if config.vocab_size > PAD_ID else config.vocab_size - 24


def token_high(config: ModelConfig) -> int:
    """Random token ids are drawn from [0, token_high): 30,000 like the peer, or below the pad id when tiny."""
    return min(30000, pad_id(config))


# -----------------------------------------------------------------------------
# Models with random weights, built on the device

@torch.no_grad()
def init_random_(module: torch.nn.Module, seed=0, std=0.02):
    """CausalLM.init_weights' scheme (normal(0, std), zero biases, unit norms) drawn on the module's device."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)
    return module


def build_causal_lm(config: ModelConfig, device, dtype=torch.float32, seed=0) -> CausalLM:
    """Our CausalLM with random weights, allocated straight on `device` (no CPU copy of 0.5B params)."""
    with torch.device(device):
        model = CausalLM(config)
    init_random_(model, seed)
    return model.to(dtype)


# -----------------------------------------------------------------------------
# Device, timing, memory

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_flops(device, override_tflops=None):
    """(peak FLOP/s, where it came from). None when unknown (CPU, or a GPU missing from PEAK_FLOPS)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = gpu_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops, f"table:{key}"
    return None, "unknown"


def reset_memory(device):
    """Free what the last case left and restart the peak counter. Call before building a case's model, so the
    peak counts weights + grads + optimizer state + activations (as the peer's numbers do)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reset_peak(device):
    """Restart the peak counter only: after a model is built and cast, so a build-time fp32 copy is not counted."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def time_steps(fn, device, warmup, steps):
    """Run fn warmup + steps times, synchronizing around each call; returns the per-step seconds of the timed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def summarize(times) -> dict:
    return dict(step_s=statistics.median(times), step_s_mean=statistics.fmean(times), step_s_min=min(times),
                steps_timed=len(times))


def mfu(config: ModelConfig, model, seq_len, tokens_per_s, device, override_tflops=None) -> dict:
    """MFU two ways: ours (6N + attention, nanoalign.model.flops_per_token) and the peer's 6N-only convention."""
    peak, source = peak_flops(device, override_tflops)
    n = matmul_params(model)
    out = dict(flops_per_token=flops_per_token(config, seq_len, n), matmul_params=n, peak_flops=peak,
               peak_source=source, mfu=None, mfu_6n=None)
    if peak:
        out["mfu"] = out["flops_per_token"] * tokens_per_s / peak
        out["mfu_6n"] = 6 * n * tokens_per_s / peak
    return out


# -----------------------------------------------------------------------------
# Command line and output

def base_parser(doc) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config and shapes, 2-3 steps: a CPU smoke test")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per bench)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; the median is reported")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default: from the GPU name, e.g. 989 for H100 SXM)")
    p.add_argument("--cases", default=None, help="comma-separated case specs (see the script's docstring)")
    return p


def setup(args, warmup, steps, tiny_warmup=1, tiny_steps=2):
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)  # TF32 left at PyTorch's default, as the training scripts do
    elif args.tiny:
        torch.set_num_threads(1)  # a busy small CPU: several threads on tiny ops oversubscribe and crawl
    if args.warmup is None:
        args.warmup = tiny_warmup if args.tiny else warmup
    if args.steps is None:
        args.steps = tiny_steps if args.tiny else steps
    return args


def meta(args) -> dict:
    return dict(gpu=gpu_name(args.device), torch=torch.__version__, tiny=bool(args.tiny))


def emit(result: dict):
    """One `RESULT {json}` line, flushed, like peer_bench.py."""
    clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}
    print("RESULT", json.dumps(clean), flush=True)


def run_cases(cases, args):
    """Run (name, fn) cases; an exception (an OOM, say) becomes an error RESULT and the next case still runs."""
    for name, fn in cases:
        try:
            r = fn()
        except Exception as e:  # keep going: one broken case must not hide the others
            import traceback
            traceback.print_exc()
            r = dict(case=name, error=repr(e)[:300])
        emit({**r, **meta(args)})
        reset_memory(args.device)


def env_line():
    """A human line for the log: where this ran."""
    bits = [f"torch {torch.__version__}", f"python {sys.version.split()[0]}"]
    if torch.cuda.is_available():
        bits.append(f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    try:
        import transformers
        bits.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    bits.append(f"pid {os.getpid()}")
    return " | ".join(bits)
