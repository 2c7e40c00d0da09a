"""One run per output dir, and nothing torn or mixed in it. All four scripts call this module:

- an exclusive lock, <out>/.lock (fcntl.flock, the holder's pid written in): a second run into the same dir stops
  at once; the OS drops the lock when the holder exits or dies, so it is never stale;
- the settings that define the run's results (every flag a script does not declare free), recorded in
  <out>/run_settings.json and in each checkpoint's marker: a rerun or --resume with other ones stops with one line
  naming them, and so do results without a record (or, with --overwrite, the earlier results move aside in one
  rename; nothing is ever deleted);
- checkpoints written file by file under temporary names (renamed into place when whole) with a marker written
  last, by rank 0 after every rank is done: `--resume auto` trusts only a dir with the marker; the temporary files
  a killed run left are removed by the next run that takes the lock;
- `--keep-checkpoints N`: the newest N complete checkpoints stay, older ones go once a newer one is complete.
"""
import errno
import fcntl
import hashlib
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


@contextmanager
def together(device=None):
    """Every rank runs the body (setup before training, a checkpoint); if it raises on any rank, every rank stops:
    the ranks that raised say why (one line, or a bug's traceback: whatever sys.excepthook prints, see
    train.one_line_errors), the others exit quietly, rather than wait in their next collective for a rank that is
    gone (a gloo traceback, or NCCL's timeout). Ends in one all-reduce, so it is also a barrier. On one process a
    plain pass-through. Usable as a decorator too."""
    if not _distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as e:
        sys.excepthook(type(e), e, e.__traceback__)  # said before the collective: once it returns torchrun may stop us
        error = e
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor(float(error is not None), device=device)
    dist.all_reduce(failed)
    if failed.item():
        raise SystemExit(1)


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


def torch_load_or_none(path, keys=()):
    """torch.load of a cache file, or None when it is missing or unreadable (cut off by a kill, a full disk), or
    holds something else than a dict with `keys` (damaged or replaced)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # EOFError, PytorchStreamReader errors, UnpicklingError: all mean a torn file
        print(f"{path} is unreadable ({type(e).__name__}): recomputing it", flush=True)
        return None
    if keys and not (isinstance(obj, dict) and set(keys) <= obj.keys()):
        print(f"{path} holds something else than expected: recomputing it", flush=True)
        return None
    return obj


def add_flags(parser, checkpoint_cost=None):
    """--overwrite for every script; with `checkpoint_cost` (what one checkpoint holds, for --help) the training
    scripts' --resume and --keep-checkpoints too."""
    from nanoalign.train import nonneg_int  # train imports this module
    if checkpoint_cost:
        parser.add_argument("--keep-checkpoints", type=nonneg_int, default=2, metavar="N",
                            help=f"keep the newest N complete ckpt-<step> dirs (0 = all). {checkpoint_cost}")
        parser.add_argument("--resume", default=None,
                            help="a ckpt-<step> dir, or `auto` for the newest complete one in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds an earlier run: move its results to <out>/replaced-<time>/ and start fresh")


# -----------------------------------------------------------------------------
# The lock

def lock_out_dir(out, device="cpu"):
    """Create `out` and hold <out>/.lock for the life of this process; raise RunDirError if another live process
    holds it (naming its pid) or `out` cannot be written. Under torchrun rank 0 takes the lock and every rank learns
    the outcome in one all-reduce, so no rank of a second job starts work in a dir that is in use."""
    out = Path(out)
    with together(device):
        if _rank() == 0 and out not in _held_locks:
            _lock(out)


def _lock(out):
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{out} is in use by another run (pid {holder}); wait for it to finish, or choose "
                          f"another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[out] = fd
    remove_leftovers(out)


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


def settings_from(args, free, unused=(), files=(), **extra):
    """The record of a run: {'--flag': value} for every flag of `args` (argparse dests) but those in `free` (they do
    not change what is computed), those in `unused` (they do not apply to this run, as --lora-r without --lora: which
    one applies follows from recorded flags) and those an `extra` entry records in another form (the flags named in
    its key, as in 'global batch (--batch-size x --grad-accum x ranks)'); then the `extra` entries. A flag is
    recorded unless it is declared free. Each recorded flag in `files` (a model, adapter or data path) that names
    local files is recorded a second time by what is there: a digest of its files' sizes and times, so a model dir
    retrained in place, or a data file edited, under the same path is another setting."""
    unknown = (set(free) | set(unused) | set(files)) - set(vars(args))
    assert not unknown, f"not flags of this script: {sorted(unknown)}"
    covered = {flag for key in extra for flag in re.findall(r"--([a-z][a-z0-9-]*)", key)}
    settings = {f"--{name.replace('_', '-')}": value for name, value in vars(args).items()
                if name not in free and name not in unused and name.replace("_", "-") not in covered}
    settings.update(extra)
    for name in files:
        flag, value = f"--{name.replace('_', '-')}", getattr(args, name)
        paths = value if isinstance(value, list) else [value]
        if flag in settings and paths and all(isinstance(v, (str, Path)) and Path(v).exists() for v in paths):
            stamps = [_files_stamp(v) for v in paths]
            settings[flag + FILES] = stamps if isinstance(value, list) else stamps[0]
    return {k: _normalise(v) for k, v in settings.items()}


FILES = " files (digest of sizes and times)"  # the key suffix of what settings_from records of a path's files


def _files_stamp(path):
    """A short digest of the (name, size, mtime) of every file at `path` (a file, or a dir's files but hidden ones,
    at any depth): rewriting a file changes it, reading does not."""
    path = Path(path)
    found = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    listing = [(f.relative_to(path).as_posix() if f != path else f.name, st.st_size, st.st_mtime_ns)
               for f in found for st in [f.stat()]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


REPLACING = ".replacing"  # an --overwrite under way: the earlier run's files, until renamed to replaced-<time>/
_records = {}  # resolved out dir -> the settings check_settings recorded there (checkpoint markers carry them)


def _entries(out, keep=()):
    """What runs left in `out`: all but hidden names (the lock, temporary files), `keep` and replaced-<time>/ dirs."""
    return sorted(p for p in out.iterdir() if not p.name.startswith((".", "replaced-")) and p.name not in keep)


def _results(out, keep=()):
    """The entries a record binds: all but the record itself and checkpoints cut off before their marker."""
    return [p for p in _entries(out, (SETTINGS, *keep))
            if not (p.is_dir() and _step(p) >= 0 and not is_complete(p))]


def _read_json(path):
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _checkpoints_record(out):
    """The settings the markers of out's complete checkpoints carry, when there are some and all agree, else None."""
    records = [(_read_json(p / MARKER) or {}).get("settings") for p in checkpoints(out) if is_complete(p)]
    return records[0] if records and isinstance(records[0], dict) and all(r == records[0] for r in records) else None


def _differences(settings, recorded):
    """'--flag new (was recorded), ...' for each setting whose recorded value differs ('(not recorded)' where the
    record lacks it: the flag did not apply then, or an older version did not record it); '' when none does.
    Recorded flags that this run leaves out (free now, or not applying) are not compared: the flags that decide
    whether they apply are. A files digest an older record lacks is no difference (older versions recorded paths
    only): the run goes on, and records it from now on."""
    return ", ".join(f"{k} {v!r} " + (f"(was {recorded[k]!r})" if k in recorded else "(not recorded)")
                     for k, v in settings.items()
                     if k in recorded and recorded[k] != v or k not in recorded and not k.endswith(FILES))


def _backup_dir(out):
    name = time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    backup, n = out / name, 1
    while backup.exists():
        n += 1
        backup = out / f"{name}-{n}"
    return backup


def _put_back_cut_overwrite(out):
    """An --overwrite killed while it moved the earlier run aside left part of it in <out>/.replacing: put it back,
    so that `out` holds the earlier run whole again (a name taken meanwhile, which no run of ours does, leaves the
    rest in a replaced-<time>/ dir)."""
    staging = out / REPLACING
    if not staging.is_dir():
        return
    for p in sorted(staging.iterdir()):
        if not (out / p.name).exists():
            p.rename(out / p.name)
    if any(staging.iterdir()):
        staging.rename(_backup_dir(out))
    else:
        staging.rmdir()
    print(f"{out}: an --overwrite was cut off while moving the earlier run aside: its files are back in place",
          flush=True)


def _move_aside(out, keep):
    """Move everything the earlier run left in `out` (but `keep`) to a new <out>/replaced-<time>/ in one rename:
    gathered first in <out>/.replacing, which a kill leaves for the next start to put back."""
    entries = _entries(out, keep)
    if not [p for p in entries if p.name != SETTINGS]:  # a record that binds nothing is simply replaced
        return
    staging = out / REPLACING
    staging.mkdir()
    for p in entries:
        p.rename(staging / p.name)
    backup = _backup_dir(out)
    staging.rename(backup)  # the one step that counts: before it the earlier run is whole, after it `out` is fresh
    print(f"--overwrite: moved the earlier results of {out} to {backup}", flush=True)


def _start_fresh(out, what):
    return f"use another --out, or --overwrite to move {what} to {out}/replaced-<time>/ and start fresh"


def _check_and_record(out, settings, overwrite, keep, resume):
    """check_settings' work, on rank 0: every refusal comes before anything is moved or written."""
    _put_back_cut_overwrite(out)
    results = _results(out, keep)
    recorded = _read_json(out / SETTINGS)
    if results and recorded is None and not overwrite:
        recorded = _checkpoints_record(out)
        problem = "is damaged (not a JSON object)" if (out / SETTINGS).exists() else "is missing"
        shown = ", ".join(p.name for p in results[:4]) + (f" and {len(results) - 4} more" if len(results) > 4 else "")
        if recorded is None:
            raise RunDirError(f"{out / SETTINGS} {problem}, so the results in {out} ({shown}) have no record of the "
                              f"settings that made them; {_start_fresh(out, 'them')}")
        print(f"{out / SETTINGS} {problem}: using the settings recorded in its checkpoints", flush=True)
    if results and not overwrite and _differences(settings, recorded):
        raise RunDirError(f"{out} holds a run with other settings: {_differences(settings, recorded)}; "
                          f"{_start_fresh(out, 'its results')}")
    if resume and resume != "auto" and (Path(resume) / MARKER).is_file():
        written = (_read_json(Path(resume) / MARKER) or {}).get("settings")
        if written is None:
            print(f"--resume {resume}: written before checkpoints recorded their settings; not compared", flush=True)
        elif _differences(settings, written):
            raise RunDirError(f"--resume {resume} was written by a run with other settings: "
                              f"{_differences(settings, written)}; resume it with those, or start without --resume")
    if overwrite:
        _move_aside(out, keep)
    write_text(out / SETTINGS, json.dumps(settings, indent=2) + "\n")


def check_settings(out, settings: dict, overwrite=False, keep=(), resume=None):
    """Record `settings` in <out>/run_settings.json, or check them against those recorded with the results there.

    Results without a record (run_settings.json missing or damaged, and no checkpoint marker carrying one) are
    refused, not taken for a fresh start; a run that stopped before writing any result binds nothing. A difference
    raises RunDirError naming each differing setting (new value, then recorded), unless `overwrite`: then everything
    the earlier run left in `out` moves to <out>/replaced-<UTC time>/ in one rename (a kill during the move leaves the
    earlier run, put back whole by the next start) and the run starts fresh. Files named in `keep` stay (caches that
    check their own validity, like train_dpo's ref_logps.pt). `resume`, a checkpoint dir, must have been written
    with the same settings (its marker carries them). Rank 0 decides; under torchrun every rank learns the outcome
    before any writes into `out`. Call after lock_out_dir.
    """
    out = Path(out)
    with together():
        if _rank() == 0:
            _check_and_record(out, settings, overwrite, keep, resume)
    _records[out.resolve()] = settings


# -----------------------------------------------------------------------------
# Checkpoints

def _step(ckpt: Path) -> int:
    suffix = ckpt.name.removeprefix("ckpt-")
    return int(suffix) if suffix.isdigit() else -1


def is_complete(ckpt) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def checkpoint_world_size(ckpt) -> int | None:
    """The number of ranks that saved a complete checkpoint (its marker says), or None if the marker is unreadable."""
    size = (_read_json(Path(ckpt) / MARKER) or {}).get("world_size")
    return size if isinstance(size, int) and size > 0 else None


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
    being rewritten is not complete any more) and written last, by rank 0, once every rank's files are in place,
    with the settings check_settings recorded for the run (so a --resume from another --out is checked too);
    then older checkpoints beyond `keep` are removed. `final` dirs get no marker and are never pruned."""
    ckpt = Path(ckpt)
    with together():
        if _rank() == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / MARKER).unlink(missing_ok=True)
    with together():  # a full disk on any rank: every rank stops, the one that hit it says so
        yield ckpt
    if _rank() == 0 and not final:
        write_text(ckpt / MARKER, json.dumps({"step": _step(ckpt), "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "settings": _records.get(ckpt.parent.resolve())}) + "\n")
        prune_checkpoints(ckpt.parent, keep, ckpt)
