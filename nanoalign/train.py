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
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # the list AdamW(fused=True) checks
from tqdm import tqdm

from nanoalign.errors import InputError
from nanoalign.jsonl import ResumableJsonl, has_fields
from nanoalign.model import nonfinite
from nanoalign.rundir import (MARKER, checkpoint_world_size, disk_errors, is_complete, latest_checkpoint, together,
                              torch_save)


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
    """Read torchrun's env (RANK, LOCAL_RANK, WORLD_SIZE); NCCL on GPUs, gloo on CPU. Plain `python` = 1 process.

    A rank waits in a collective at most $NANOALIGN_DIST_TIMEOUT seconds (default 1800; torch's NCCL default is
    600) for the others, then fails. Work one rank does alone while the others wait in a collective must fit it:
    what can take longer (building the token cache) is waited for through the file system instead."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available() if device_name is None else check_device(device_name).type == "cuda"
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dist_timeout())
    return Dist(rank, local_rank, world, device)


def check_device(name) -> torch.device:
    """--device, checked once before any work: a device string torch knows, and for CUDA a GPU that is visible
    (an InputError naming the flag, not torch's `Invalid device string` or `no attribute '_cuda_setDevice'`)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = ("this torch is a CPU-only build" if torch.version.cuda is None else
                   f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no GPU or no driver")
            raise InputError(f"--device {name}: no CUDA GPU is visible ({why})")
        if (device.index or 0) >= count:
            raise InputError(f"--device {name}: only {count} CUDA GPU(s) visible")
    elif device.type != "cpu":  # mps, xpu, ...: a tensor there tells whether this machine has one
        try:
            torch.empty(0, device=device)
        except Exception:
            raise InputError(f"--device {name}: torch cannot use a {device.type} device on this machine") from None
    return device


def dist_timeout():
    text = os.environ.get("NANOALIGN_DIST_TIMEOUT", "1800")
    seconds = timeout_seconds.parse(text)
    if seconds is None:
        raise InputError(f"NANOALIGN_DIST_TIMEOUT must be {timeout_seconds.want} (seconds), got {text!r}")
    return timedelta(seconds=seconds)


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


class Number:
    """argparse type: a finite number (never NaN or inf) in [lo, hi], either end open; an int with `integer`.
    Every numeric flag of the scripts has one, so a value that makes no sense fails at parsing, in argparse's one
    line naming the flag as typed (exit 2), before anything is loaded or asked:
        --tie-eps -1  ->  "error: argument --tie-eps: must be a number >= 0, got '-1'"
    """

    def __init__(self, lo, hi=math.inf, lo_open=False, hi_open=False, integer=False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer

    def __contains__(self, value):
        finite = isinstance(value, int) or math.isfinite(value)  # (isfinite(10**400) would raise OverflowError)
        return (finite and (self.lo < value if self.lo_open else self.lo <= value)
                and (value < self.hi if self.hi_open else value <= self.hi))

    @property
    def want(self):
        """The range in words: "an integer >= 1", "a number in [0, 1)"."""
        kind = "an integer" if self.integer else "a number"
        lo, hi = (str(x) if isinstance(x, int) else f"{x:g}" for x in (self.lo, self.hi))
        if self.hi == math.inf:
            return f"{kind} {'>' if self.lo_open else '>='} {lo}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def parse(self, text):
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            return None
        return value if value in self else None

    def __call__(self, text):
        value = self.parse(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {self.want}, got {text!r}")
        return value


class Weights(Number):
    """argparse type: comma-separated numbers >= 0, not all 0 (mixing weights, one per source: "1,0.25")."""

    def __init__(self):
        super().__init__(0)

    @property
    def want(self):
        return "comma-separated numbers >= 0, not all 0"

    def __call__(self, text):
        values = [self.parse(w) for w in text.split(",")]
        if None in values or not any(values):
            raise argparse.ArgumentTypeError(f"must be {self.want}, got {text!r}")
        return values


positive_int = Number(1, integer=True)
nonneg_int = Number(0, integer=True)
positive_float = Number(0, lo_open=True)
nonneg_float = Number(0)
probability = Number(0, 1, lo_open=True)  # top-p
fraction = Number(0, 1, hi_open=True)  # [0, 1): a share held out, a dropout
zero_to_one = Number(0, 1)  # a ratio or a similarity
# sockets and timers overflow past threading.TIMEOUT_MAX (~9.2e9 s on Linux); 1e9 s is already 31 years
timeout_seconds = Number(0, 1e9, lo_open=True)
# >= 0: Python's random.Random(-s) is random.Random(s); <= 2^63 - 1: torch.manual_seed(seed + rank) must fit 64 bits
random_seed = Number(0, 2 ** 63 - 1, integer=True)


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
    """Leave the process group together, at the end of a run (every rank calls it).

    Gloo's worker threads free a finished collective's tensors after the caller has moved on, and freeing one the
    caller has dropped takes the GIL; once the interpreter is shutting down, a thread that asks for the GIL is ended
    mid-destructor and the process aborts ("terminate called without an active exception", SIGABRT), so torchrun
    reports a finished, saved run as failed (1 run in ~25 of a 3-step DDP SFT under load). The barrier and a moment
    with the GIL released let those threads finish first."""
    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
        if gloo:
            time.sleep(0.05)


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
    """Raise NonFiniteError instead of saving a NaN/inf weight. Every rank calls it and checks what it holds (all of
    it under DDP, its shard under FSDP); under rundir.together a rank that finds one says so and every rank stops,
    rather than some waiting at a barrier or a gather."""
    with together():
        bad = nonfinite((n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()
                        if p.requires_grad)
        if bad:
            where = f"{bad[0]}{f' and {len(bad) - 1} more' if bad[1:] else ''}"
            raise NonFiniteError(f"step {step}: non-finite weights ({where}): not saved; lower --lr or resume from "
                                 f"an earlier checkpoint")


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
            old = ResumableJsonl(self.path, check=has_fields(dict(step=int)))  # drops a line cut off by a kill
            keep = [r for r in old.rows if r["step"] <= start_step]
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
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAIN_STATE = "train_state.pt"


def save_train_state(ckpt_dir, optimizer, scaler, step, sharded=False, **extra):
    """Everything but the weights: optimizer moments, scaler, step, RNG and any `extra` (e.g. args), written under a
    temporary name and renamed when whole (rundir.torch_save). Every rank calls it.

    Under DDP (and on one process) the optimizer state is the same on every rank, so rank 0 writes it once, to
    train_state.pt, with every rank's RNG state: any number of ranks can resume it. sharded=True (FSDP: each rank
    holds its own part of the optimizer state): each rank writes its part to train_state_rank<r>.pt, and only as
    many ranks can resume it."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))

    def state(rng):
        return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "rng": rng, **extra}
    if sharded:
        torch_save(state(rng_state()), ckpt_dir / f"train_state_rank{rank}.pt")
        return
    rngs = [rng_state()]
    if dist.is_available() and dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        torch_save(state(rngs), ckpt_dir / TRAIN_STATE)


def load_train_state(ckpt_dir, optimizer, scaler, sharded=False):
    """Restore what save_train_state wrote, on any number of ranks (sharded: as many as saved it; resolve_resume
    checks that first). Rank r takes rank r's RNG state where it was saved. Checkpoints of earlier versions
    (train_state_rank<r>.pt under DDP) resume too: rank 0's optimizer state serves a rank that has no file. Every
    rank calls it; a damaged file on any rank stops every rank, with one line naming it."""
    with together():
        return _load_train_state(Path(ckpt_dir), optimizer, scaler, sharded)


def _load_train_state(ckpt, optimizer, scaler, sharded):
    rank = int(os.environ.get("RANK", 0))
    whole, own = ckpt / TRAIN_STATE, ckpt / f"train_state_rank{rank}.pt"
    if whole.exists() and not sharded:
        state = _read_train_state(whole)
        rng = state["rng"][rank] if rank < len(state["rng"]) else None  # a rank the saving run lacked keeps its seed
    else:  # FSDP's parts, or an earlier version's DDP layout saved by as many ranks (own) or fewer (rank 0's)
        path = own if own.exists() or sharded else ckpt / "train_state_rank0.pt"
        state = _read_train_state(path)
        rng = state["rng"] if path == own else None
        if bool(state.get("args", {}).get("fsdp")) != sharded:
            was = "with" if not sharded else "without"
            raise InputError(f"cannot resume {ckpt}: it was saved {was} --fsdp; resume it {was} --fsdp")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"cannot resume {ckpt}: it holds the optimizer state of another model or setup "
                         f"({type(e).__name__}: {str(e)[:200]}); resume from a checkpoint of this run") from None
    if rng is not None:
        set_rng_state(rng)
    return state


def _read_train_state(path):
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} not found")
    try:
        # mmap: the ranks that read the same file share its pages instead of each holding a copy in memory
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # only reachable for a file damaged after it was written: ours are renamed in whole
        raise InputError(f"cannot resume: {path} is unreadable ({type(e).__name__}); resume from an earlier "
                         f"checkpoint") from None
    if not (isinstance(state, dict) and {"optimizer", "scaler", "step", "rng"} <= state.keys()
            and isinstance(state["step"], int) and isinstance(state["optimizer"], dict)):
        raise InputError(f"cannot resume: {path} is not a train state (damaged or replaced); resume from an "
                         f"earlier checkpoint")
    return state


def resolve_resume(resume, out_dir, sharded=False):
    """`--resume auto` picks the newest complete checkpoint in out_dir (or starts fresh); a path must be complete.
    Either way it is checked, before any work, that this run can resume it: a train state is there and, sharded
    (--fsdp), was saved by as many ranks as this run has."""
    if not resume:
        return None
    if resume == "auto":
        ckpt = latest_checkpoint(out_dir)
    elif not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint dir")
    elif not is_complete(resume):
        raise InputError(f"--resume {resume}: incomplete checkpoint (no {MARKER}: cut off while being written); "
                         f"pick an earlier one or --resume auto")
    else:
        ckpt = Path(resume)
    if ckpt is not None:
        _check_resumable(ckpt, sharded)
    return ckpt


def _check_resumable(ckpt, sharded):
    world = int(os.environ.get("WORLD_SIZE", 1))
    parts = len(list(ckpt.glob("train_state_rank*.pt")))
    if sharded and (ckpt / TRAIN_STATE).exists():
        raise InputError(f"cannot resume {ckpt} with --fsdp: it was saved without --fsdp; resume it without --fsdp")
    if not parts and not (ckpt / TRAIN_STATE).exists():
        raise InputError(f"cannot resume {ckpt}: no train state in it ({TRAIN_STATE}); resume from another "
                         f"checkpoint")
    saved = checkpoint_world_size(ckpt) or parts
    if sharded and saved != world:
        raise InputError(f"cannot resume {ckpt} on {world} ranks: --fsdp saved its optimizer state in {saved} "
                         f"shards, one a rank; resume it on {saved} (torchrun --nproc_per_node={saved})")
