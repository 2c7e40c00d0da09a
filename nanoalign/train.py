"""What every training script needs and nothing more: DDP setup, precision, optimizer and schedule, progress bar,
JSONL metrics, and checkpoints that resume exactly. The loops themselves live, flat, in the scripts."""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # the list AdamW(fused=True) checks
from tqdm import tqdm

from nanoalign.errors import InputError
from nanoalign.jsonl import ResumableJsonl
from nanoalign.rundir import MARKER, disk_errors, is_complete, latest_checkpoint, torch_save


# -----------------------------------------------------------------------------
# Distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device_name=None) -> Dist:
    """Read torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE); NCCL on GPUs, gloo on CPU. Plain `python` = 1 process."""
    cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, device)


def one_line_errors(*extra_types):
    """Bad input ends the script with one line on stderr instead of a traceback: an InputError (its message names
    the file, line, field or flag), a missing or unreadable path the user gave, a diverged run (NonFiniteError), or
    one of `extra_types`. Anything else is a bug and keeps its traceback. NANOALIGN_TRACEBACK=1 shows tracebacks for everything."""
    types = (InputError, NonFiniteError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
             *extra_types)

    def hook(kind, value, tb):
        if issubclass(kind, types) and not os.environ.get("NANOALIGN_TRACEBACK"):
            print(f"error: {value}", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, value, tb)
    sys.excepthook = hook


def positive_int(text):
    """argparse type: an integer >= 1 (`--batch-size 0` fails at parsing, naming the flag)."""
    return _checked(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text):
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return _checked(text, float, lambda v: v > 0 and math.isfinite(v), "a number > 0")


def nonneg_float(text):
    return _checked(text, float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def probability(text):
    return _checked(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _checked(text, kind, ok, want):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
    return value


# The oldest torch each call needs. The core path (SDPA with enable_gqa) sets pyproject.toml's floor; a flag whose
# call is newer checks it with require_torch, so an older torch gets one line naming the flag, not an AttributeError.
TORCH_FLOOR = "2.5"  # F.scaled_dot_product_attention(enable_gqa=) and flex_attention(enable_gqa=)
TORCH_FOR = {"--fsdp": "2.6",  # torch.distributed.fsdp.fully_shard (FSDP2) public
             "--pack-attn varlen": "2.12"}  # torch.nn.attention.varlen.varlen_attn(enable_gqa=)


def require_torch(feature):
    """InputError when the installed torch is older than what `feature` (a key of TORCH_FOR) calls."""
    have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    need = TORCH_FOR[feature]
    if have < tuple(int(x) for x in need.split(".")):
        raise InputError(f"{feature} needs torch >= {need} (installed: {torch.__version__})")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: float | int, device) -> float:
    """Sum a number over ranks (a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def maybe_no_sync(model, sync: bool):
    """DDP all-reduces on every backward; on accumulation micro-steps we skip it (PITFALLS #4)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def wrap_ddp(model, d: Dist):
    """DDP overlaps its bucketed all-reduce with the backward pass; only trainable params are registered."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)


def wrap_fsdp(model, d: Dist, precision):
    """FSDP2: each decoder block, then the whole model, sharded over the ranks (parameters, gradients and
    optimizer state: 1/world of each per rank). Build the optimizer after this. Under bf16 on CUDA the gathered
    parameters are bf16 and gradients are reduced in fp32; otherwise fp32 throughout (as the tests on CPU run)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    low = precision == "bf16" and d.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if low else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model):
    """The full (unsharded) state dict on CPU of an FSDP model, on rank 0 (empty elsewhere); all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Precision, optimizer, schedule

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA GPU that supports it, fp32 otherwise: on a CPU bf16 autocast is emulated and many times slower
    (an SFT step 25x slower than fp32 on an AVX2 CPU)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def choose_precision(precision: str | None, device: torch.device) -> str:
    """--precision as the user gave it, or the device's default (printed, so the log says which was used)."""
    if precision is None:
        precision = default_precision(device)
        print0(f"precision: {precision} (the default on {device.type}; --precision to choose)")
    return precision


def autocast(device: torch.device, precision: str):
    """Weights stay fp32 (the master copy AdamW updates); matmuls run in bf16/fp16 under autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def make_scaler(device, precision):
    """fp16 needs loss scaling (its 5-bit exponent underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """AdamW over trainable params; matrices decay, biases and norm weights do not (the usual GPT recipe).

    Fused (one kernel over all params) wherever torch has the kernel: CUDA and, since torch 2.4, the CPU, for every
    floating dtype; on a CPU it is ~10x faster than the per-tensor loop. foreach (multi-tensor) otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=not fused)


def lr_at(step, total_steps, lr, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0, step_every=1, gamma=0.5):
    """Linear warmup, then cosine or linear decay to lr * min_lr_ratio, constant, or `step`: x gamma every
    step_every steps (torch's StepLR)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** (step // step_every)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)


def beta_at(step, beta, warmup_steps=0):
    """DPO's beta, ramped linearly over the first warmup_steps steps (beta / warmup_steps at step 0), then flat."""
    return beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else beta


def optimizer_step(model, optimizer, scaler, clip, loss=0.0):
    """Unscale (fp16), clip the trainable params' gradient norm (clip 0: no clipping), step, zero the grads.

    A step whose loss (pass the global one, so that every rank decides alike) or gradient norm is not finite is
    skipped: its update would put NaN/inf into the weights. Under fp16 an overflowed gradient with a finite loss is
    the GradScaler's usual skip (it lowers its scale and goes on); that one is not a bad step.
    Returns (the gradient norm before clipping, whether this was a bad step)."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    bad = not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled())
    if not bad:
        scaler.step(optimizer)  # skipped by the scaler when an fp16 gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


class NonFiniteError(RuntimeError):
    """Training diverged (non-finite loss, gradients or weights): one line from one_line_errors, nothing saved."""


class DivergenceGuard:
    """Stops a run after `limit` consecutive bad steps (0: never); a good step resets the count."""

    def __init__(self, limit):
        self.limit, self.in_a_row = limit, 0

    def update(self, step, bad, loss, grad_norm):
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteError(f"step {step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}) "
                                 f"for {self.in_a_row} steps in a row (--max-bad-steps {self.limit}): stopped, "
                                 f"nothing saved; lower --lr or resume from an earlier checkpoint")


def check_finite_weights(model, step):
    """Raise NonFiniteError instead of saving a NaN/inf weight. Every rank calls it (each checks what it holds: all
    of it under DDP, its shard under FSDP) and the verdict is summed over ranks, so all stop together rather than
    some waiting at a barrier or a gather."""
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    if all_reduce_sum(len(bad), next(model.parameters()).device):
        where = f"{bad[0]}{f' and {len(bad) - 1} more' if bad[1:] else ''}" if bad else "in another rank's shard"
        raise NonFiniteError(f"step {step}: non-finite weights ({where}): not saved; lower --lr or resume from an "
                             f"earlier checkpoint")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# -----------------------------------------------------------------------------
# Progress and metrics

class Progress:
    """A tqdm bar on stderr: `sft:  12%|██▎      | 12/100 [00:05<00:42, 2.30step/s, loss=1.23, 45.1k tok/s]`.

    On a terminal tqdm redraws it in place. Anywhere else (a log file, a pipe) a redrawn bar would be one long
    line of carriage returns, so the same text is printed as a plain line every `log_every` of the total (and
    at least every `log_seconds`), and at the end. total=None counts without a bar (e.g. rows tokenised).
    Disabled (enabled=False, e.g. ranks other than 0) it prints nothing.
    """

    def __init__(self, total, desc="", enabled=True, start=0, unit="step", log_every=0.05, log_seconds=60.0):
        self.total, self.desc, self.unit, self.start = total, desc, unit, start
        self.n, self.postfix, self.t0 = start, "", time.time()
        self.tty = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.tty
        self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, disable=not self.tty, file=sys.stderr,
                        dynamic_ncols=True)
        self.every = max(1, int((total or 0) * log_every)) if total else None
        self.log_seconds, self.last_line, self.last_time = log_seconds, start, self.t0

    def update(self, n=1, *notes, **fields):
        """Advance by n; show `key=value` fields (floats to 4 significant digits), then notes such as rate()'s."""
        self.n += n
        self.postfix = ", ".join([f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
                                 + list(notes))
        if self.tty:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.lines:
            now = time.time()
            due = self.every and self.n - self.last_line >= self.every or now - self.last_time >= self.log_seconds
            if due or self.n == self.total:
                self.last_line, self.last_time = self.n, now
                self._line()

    def _line(self):
        print(tqdm.format_meter(self.n, self.total, time.time() - self.t0, prefix=self.desc, unit=self.unit,
                                initial=self.start, postfix=self.postfix or None, bar_format=LOG_FORMAT
                                if self.total else None), file=sys.stderr, flush=True)

    def close(self):
        if self.lines and self.n != self.last_line:
            self._line()
        self.bar.close()


LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def track(iterable, desc, enabled=True, unit="rows"):
    """Iterate with a Progress counting items (no total needed), e.g. rows read and tokenised."""
    progress = Progress(None, desc, enabled, unit=unit)
    for item in iterable:
        yield item
        progress.update()
    progress.close()


def rate(count, seconds, unit):
    """A speed with units that fit its size: `12.3 tok/s`, `0.42 tok/s`, `45.1k tok/s` (never `0.0k`)."""
    return f"{tqdm.format_sizeof(count / max(seconds, 1e-9))} {unit}/s"


class MetricsLog:
    """Append one JSON object per line to `path` (rank 0 only). A run that starts at `start_step` (a resume, or 0)
    first drops the rows past that step (steps a killed run logged after its last checkpoint, which are about to
    be redone), so the file holds one row per step."""

    def __init__(self, path, enabled=True, start_step=0):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            old = ResumableJsonl(self.path)  # drops a line cut off by a kill
            keep = [r for r in old.rows if r.get("step", 0) <= start_step]
            if len(keep) != len(old.rows):
                old.rewrite(keep)  # atomic: a kill now leaves the old file or the new one

    def log(self, **row):
        if self.enabled:
            with disk_errors(self.path), self.path.open("a") as f:
                f.write(json.dumps({k: _json_number(v) for k, v in row.items()}, allow_nan=False) + "\n")


def _json_number(v):
    """Floats kept to 9 significant digits (a float32's full precision, what TensorBoard stores: an lr of 1.25e-7
    stays 1.25e-07, never 0.0); NaN/inf become null (JSON has no NaN: a NaN token breaks every JSON reader)."""
    if isinstance(v, float):
        return float(f"{v:.9g}") if math.isfinite(v) else None
    return v


# -----------------------------------------------------------------------------
# Checkpoints: the model as an HF dir (or an adapter dir), plus the state needed to resume exactly

def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(ckpt_dir, optimizer, scaler, step, **extra):
    """Everything but the weights: optimizer moments, scaler, step, RNG (per rank) and any `extra` (e.g. args).
    Written under a temporary name and renamed when whole (rundir.torch_save)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    torch_save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": rng_state(), **extra}, ckpt_dir / f"train_state_rank{rank}.pt")


def load_train_state(ckpt_dir, optimizer, scaler):
    path = Path(ckpt_dir) / f"train_state_rank{int(os.environ.get('RANK', 0))}.pt"
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} not found (was the run saved with fewer ranks?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # only reachable for a file damaged after it was written: ours are renamed in whole
        raise InputError(f"cannot resume: {path} is unreadable ({type(e).__name__}); resume from an earlier "
                         f"checkpoint") from None
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def resolve_resume(resume, out_dir):
    """`--resume auto` picks the newest complete checkpoint in out_dir (or starts fresh); a path must be complete."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint dir")
    if not is_complete(resume):
        raise InputError(f"--resume {resume}: incomplete checkpoint (no {MARKER}: cut off while being written); "
                         f"pick an earlier one or --resume auto")
    return Path(resume)
