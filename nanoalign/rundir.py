"""One run per output dir, and nothing torn or mixed in it. All four scripts call this module:

- an exclusive lock, <out>/.lock (fcntl.flock, the holder's pid written in): a second run into the same dir stops
  at once; the OS drops the lock when the holder exits or dies, so it is never stale;
- the settings that define the run's results, recorded in <out>/run_settings.json: a rerun with other ones stops
  with one line naming them (or, with --overwrite, moves the earlier results aside; nothing is ever deleted);
- checkpoints written file by file under temporary names (renamed into place when whole) with a marker written
  last, by rank 0 after every rank is done: `--resume auto` trusts only a dir with the marker; the temporary files
  a killed run left are removed by the next run that takes the lock;
- `--keep-checkpoints N`: the newest N complete checkpoints stay, older ones go once a newer one is complete.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from nanoalign.errors import InputError

LOCK = ".lock"
SETTINGS = "run_settings.json"
MARKER = "checkpoint_complete.json"
TEMP_NAME = re.compile(r"\..+\.tmp(\d+)")  # atomic_path's temporary files: .<name>.tmp<pid>
_held_locks = {}  # out dir -> open fd: held until this process exits, when the OS releases the flock


class RunDirError(InputError):
    """A run-dir problem the user fixes (dir in use, other settings, full disk, read-only): one line, no traceback."""


def _rank():
    return int(os.environ.get("RANK", 0))


def _distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if _distributed():
        dist.barrier()


# -----------------------------------------------------------------------------
# Writing files whole, and saying so when the disk is full

def _disk_error(e: BaseException, path: Path, full=False) -> RunDirError | None:
    """The one-line error for a full or read-only disk (OSError, or a library's wrapped 'os error 28'), else None."""
    if full or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
        return RunDirError(f"no space left on {path.parent} (writing {path.name}); what was written before is kept")
    if getattr(e, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RunDirError(f"cannot write {path}: {e.strerror}")
    return None


@contextmanager
def disk_errors(path):
    """Turn a full/read-only disk while writing `path` into one line naming its dir."""
    try:
        yield
    except OSError as e:
        raise (_disk_error(e, Path(path)) or e) from None


def _out_of_space(path: Path) -> bool:
    """Is the disk under `path` (all but) full? torch.save can report ENOSPC as a bare 'unexpected pos'."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; once the body has written it, fsync and rename it to `path`. A reader
    (or a run resumed after a kill) sees the old file or the whole new one, never half of one. On failure the
    temporary file is removed and a full disk is reported in one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and _out_of_space(path)  # before the partial file is removed
        tmp.unlink(missing_ok=True)
        error = _disk_error(e, path, full)
        if error is not None:
            raise error from None
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def torch_save(obj, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: torch then raises OSError on a full disk
        torch.save(obj, f)


def torch_load_or_none(path):
    """torch.load of a cache file, or None when it is missing or unreadable (cut off by a kill, a full disk)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # EOFError, PytorchStreamReader errors, UnpicklingError: all mean a torn file
        print(f"{path} is unreadable ({type(e).__name__}): recomputing it", flush=True)
        return None


def add_flags(parser, checkpoint_cost=None):
    """--overwrite for every script; with `checkpoint_cost` (what one checkpoint holds, for --help) the training
    scripts' --resume and --keep-checkpoints too."""
    if checkpoint_cost:
        parser.add_argument("--keep-checkpoints", type=_nonneg_int, default=2, metavar="N",
                            help=f"keep the newest N complete ckpt-<step> dirs (0 = all). {checkpoint_cost}")
        parser.add_argument("--resume", default=None,
                            help="a ckpt-<step> dir, or `auto` for the newest complete one in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds an earlier run: move its results to <out>/replaced-<time>/ and start fresh")


def _nonneg_int(text):
    from nanoalign.train import nonneg_int  # train imports this module
    return nonneg_int(text)


# -----------------------------------------------------------------------------
# The lock

def lock_out_dir(out, device="cpu"):
    """Create `out` and hold <out>/.lock for the life of this process; raise RunDirError if another live process
    holds it (naming its pid) or `out` cannot be written. Under torchrun rank 0 takes the lock and every rank learns
    the outcome in one all-reduce, so no rank of a second job starts work in a dir that is in use."""
    out = Path(out)
    error = None
    if _rank() == 0 and out not in _held_locks:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            error = f"--out {out}: cannot write there ({e.strerror})"
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                error = (f"{out} is in use by another run (pid {holder}); wait for it to finish, or choose "
                         f"another --out")
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                _held_locks[out] = fd
                remove_leftovers(out)
    if _distributed():
        if error:  # said before the collective: once it returns the other ranks exit, and torchrun stops this one
            print(f"error: {error}", file=sys.stderr, flush=True)
        failed = torch.tensor(float(error is not None), device=device)
        dist.all_reduce(failed)
        if failed.item():
            raise SystemExit(1)
    if error:
        raise RunDirError(error)


def remove_leftovers(out):
    """Remove the temporary files (atomic_path's .<name>.tmp<pid>, up to a whole checkpoint file) that killed
    processes left anywhere under `out`. Called once the lock is held and before this run writes anything: no other
    run writes there, so a file whose process is gone is debris; one of a live process (not this one) stays."""
    removed, size = 0, 0
    for path in Path(out).rglob(".*.tmp*"):
        match = TEMP_NAME.fullmatch(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            try:
                n = path.stat().st_size
                path.unlink()
            except OSError:  # gone meanwhile, or not ours to remove: leave it
                continue
            removed, size = removed + 1, size + n
    if removed:
        print(f"removed {removed} temporary file{'s' * (removed > 1)} ({size:,} bytes) that killed runs left in {out}",
              flush=True)


def _alive(pid):
    if pid == os.getpid():  # this process has written nothing yet: the file is a killed run's that had our pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# -----------------------------------------------------------------------------
# Recorded settings

def _normalise(value):
    """JSON-able, and an existing local path made absolute, so `runs/sft` and `./runs/sft/` compare equal."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def settings_from(args, names, **extra):
    """{'--flag': value} for each argparse dest in `names`, plus `extra` entries (keys as they should be shown)."""
    settings = {f"--{name.replace('_', '-')}": getattr(args, name) for name in names}
    settings.update(extra)
    return {k: _normalise(v) for k, v in settings.items()}


def _results(out, keep=()):
    return [p for p in out.iterdir() if p.name not in (LOCK, *keep) and not p.name.startswith("replaced-")]


def check_settings(out, settings: dict, overwrite=False, keep=()):
    """Record `settings` in <out>/run_settings.json, or check them against those recorded by an earlier run.

    Settings recorded by a run that left no results are replaced. A difference raises RunDirError naming each
    differing setting (new value, then recorded), unless `overwrite`:
    then everything the earlier run left in `out` is moved to <out>/replaced-<UTC time>/ and the run starts fresh.
    `overwrite` moves earlier results aside even when the settings agree; files named in `keep` stay (caches that
    check their own validity, like train_dpo's ref_logps.pt). Call after lock_out_dir.
    """
    out = Path(out)
    path = out / SETTINGS
    # settings guard results: a run that stopped before writing any (bad input, say) binds no later run
    recorded = json.loads(path.read_text()) if path.exists() and _results(out, keep=[SETTINGS]) else None
    if overwrite:
        if _rank() == 0 and _results(out, keep):
            backup = out / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
            backup.mkdir()
            for p in _results(out, keep):
                p.rename(backup / p.name)
            print(f"--overwrite: moved the earlier results of {out} to {backup}", flush=True)
        recorded = None
    elif recorded is not None and recorded != settings:
        keys = [k for k in {**recorded, **settings} if recorded.get(k) != settings.get(k)]
        shown = ", ".join(f"{k} {settings.get(k)!r} (was {recorded.get(k)!r})" for k in keys)
        raise RunDirError(f"{out} holds a run with other settings: {shown}; use another --out, or --overwrite to "
                          f"move its results to {out}/replaced-<time>/ and start fresh")
    if recorded is None and _rank() == 0:
        write_text(path, json.dumps(settings, indent=2) + "\n")
    barrier()  # no rank writes into `out` before rank 0 has moved the old results away


# -----------------------------------------------------------------------------
# Checkpoints

def _step(ckpt: Path) -> int:
    suffix = ckpt.name.removeprefix("ckpt-")
    return int(suffix) if suffix.isdigit() else -1


def is_complete(ckpt) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def checkpoints(out_dir) -> list[Path]:
    """Every ckpt-<step> dir under out_dir, oldest first (complete or not)."""
    return sorted((p for p in Path(out_dir).glob("ckpt-*") if p.is_dir() and _step(p) >= 0), key=_step)


def latest_checkpoint(out_dir):
    """The newest complete ckpt-<step> dir (one with the marker), or None: an incomplete one is skipped."""
    complete = [p for p in checkpoints(out_dir) if is_complete(p)]
    for p in checkpoints(out_dir):
        if not is_complete(p) and (not complete or _step(p) > _step(complete[-1])) and _rank() == 0:
            print(f"skipping {p}: incomplete (cut off while being written)", flush=True)
    return complete[-1] if complete else None


def prune_checkpoints(out_dir, keep, current):
    """Keep the newest `keep` complete checkpoints (0 = all); remove older complete ones, and incomplete leftovers
    older than `current` (never `current` itself, nor final/)."""
    complete = [p for p in checkpoints(out_dir) if is_complete(p)]
    old = complete[:-keep] if keep else []
    debris = [p for p in checkpoints(out_dir) if not is_complete(p) and _step(p) < _step(Path(current))]
    for p in old + debris:
        if p.resolve() != Path(current).resolve():
            (p / MARKER).unlink(missing_ok=True)  # first: a kill mid-removal must not leave a "complete" husk
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def checkpoint(ckpt, keep=0, final=False):
    """Write a checkpoint dir in the body (every rank enters): the marker is removed first (a dir of an earlier run
    being rewritten is not complete any more) and written last, by rank 0, once every rank's files are in place;
    then older checkpoints beyond `keep` are removed. `final` dirs get no marker and are never pruned."""
    ckpt = Path(ckpt)
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / MARKER).unlink(missing_ok=True)
    barrier()
    yield ckpt
    barrier()
    if _rank() == 0 and not final:
        write_text(ckpt / MARKER, json.dumps({"step": _step(ckpt), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        prune_checkpoints(ckpt.parent, keep, ckpt)
