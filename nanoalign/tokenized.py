"""Tokenise once: SFT datasets as flat arrays on disk, built by one process and memory-mapped by every rank.

    ds = sft_dataset("HuggingFaceTB/smol-smoltalk", "train", None, chat, 2048, "drop", cache_dir, is_builder)
    ds[i]["ids"], ds[i]["mask"]       # numpy views of example i (int32 ids, uint8 mask)
    train = ds.subset(train_indices)  # same arrays, another index

On disk, <cache_dir>/sft-<fingerprint>/ holds ids.npy [tokens] int32, mask.npy [tokens] uint8, offsets.npy
[n + 1] int64 and stats.json. The fingerprint covers the data files (path, size, mtime; a hub dataset's commit),
the tokenizer (its whole tokenizer.json), the default system prompt, the rendering code (chat.py, data.py) and the
settings (max_len, truncation), so any change rebuilds and a rerun or another rank only loads. The directory is
written under a temporary name and renamed into place: a killed build leaves no half cache behind (and the next
build removes what it left). A cache damaged anyway (a file cut or garbled, stats.json gone, an id the tokenizer
does not have) fails a cheap check on load and is rebuilt: it is disposable. Loaded with mmap, the token arrays live
once in the page cache, shared by all ranks on a node: 5 bytes a token, against ~49 bytes a token in every rank for
Python lists of ints.

Under torchrun local rank 0 builds while holding <cache_dir>/.sft-<fingerprint>.lock; the other ranks wait for the
finished cache by polling the file system, not in a collective, so a build may take longer than the process-group
timeout (a smol-smoltalk build takes tens of minutes; NCCL's timeout is 10). If the builder stops without
finishing, its lock goes with it and the others stop too, with one line.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from array import array
from pathlib import Path

import numpy as np

from nanoalign import chat as chat_module
from nanoalign import data as data_module
from nanoalign.data import data_files, read_records, sft_rows
from nanoalign.errors import InputError
from nanoalign.rundir import _alive, _disk_error, _out_of_space, disk_errors, together

FORMAT = 1  # bump when the layout or the rendering changes in a way the source hashes would not catch


class TokenizedSet:
    """Examples i = 0..n-1 of flat arrays: ids[offsets[k]:offsets[k + 1]] with k = index[i]."""

    def __init__(self, ids, mask, offsets, index=None, stats=None):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.index = np.arange(len(offsets) - 1) if index is None else np.asarray(index, dtype=np.int64)
        self.stats = stats or {}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        k = self.index[i]
        s, e = self.offsets[k], self.offsets[k + 1]
        return {"ids": self.ids[s:e], "mask": self.mask[s:e]}

    @property
    def lengths(self):
        return (self.offsets[self.index + 1] - self.offsets[self.index]).tolist()

    def subset(self, indices):
        return TokenizedSet(self.ids, self.mask, self.offsets, self.index[np.asarray(indices, dtype=np.int64)],
                            self.stats)

    def save(self, out_dir):
        """Write atomically: a temporary sibling dir, renamed into place (a finished cache is never overwritten).
        A full disk is one line naming the dir, with the temporary dir removed."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{_me()}")
        try:
            tmp.mkdir(parents=True)
            for name in ("ids", "mask", "offsets"):
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
            (tmp / "stats.json").write_text(json.dumps(self.stats) + "\n")
        except BaseException as e:
            full = isinstance(e, OSError) and _out_of_space(tmp)  # numpy says only "2796 requested and 992 written"
            shutil.rmtree(tmp, ignore_errors=True)
            error = isinstance(e, OSError) and _disk_error(e, out_dir, full)
            if error:
                raise error from None
            raise
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished the same cache first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
            if not out_dir.exists():
                raise

    @classmethod
    def load(cls, path, vocab_size=None):
        """Memory-map a saved set, checked cheaply first: the files parse, the arrays' shapes, dtypes and offsets
        agree with each other and with stats.json, and every id is in [0, vocab_size) (the tokenizer's size; one
        pass over ids, read as uint32 so a negative id counts as huge). A damaged set raises ValueError saying what
        is wrong."""
        path = Path(path)
        try:
            stats = json.loads((path / "stats.json").read_text())
            ids, mask, offsets = (np.load(path / f"{name}.npy", mmap_mode="r") for name in ("ids", "mask", "offsets"))
        except (OSError, ValueError, EOFError) as e:  # missing, cut (mmap longer than the file), 0 bytes, garbled
            raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
        sound = (isinstance(stats, dict) and (ids.dtype, mask.dtype, offsets.dtype) == (np.int32, np.uint8, np.int64)
                 and ids.ndim == offsets.ndim == 1 and mask.shape == ids.shape and len(offsets) >= 1
                 and offsets[0] == 0 and offsets[-1] == len(ids) and not (np.diff(offsets) < 0).any()
                 and stats.get("tokens") == len(ids) and stats.get("kept") == len(offsets) - 1)
        if not sound:
            raise ValueError(f"{path}: its arrays and stats.json do not agree")
        if vocab_size is not None and len(ids) and int(ids.view(np.uint32).max()) >= vocab_size:
            raise ValueError(f"{path}: ids.npy holds ids outside the tokenizer's {vocab_size} tokens")
        return cls(ids, mask, offsets, stats=stats)


def build_sft(records, chat, max_len, truncation, progress=True):
    """Render every row (sft_rows) straight into growing flat buffers, with a progress bar: a TokenizedSet."""
    from nanoalign.train import Progress, rate

    ids, mask, offsets, stats = array("i"), bytearray(), array("q", [0]), {}
    t0 = time.time()
    # a bar on a terminal; in a log, a line every minute (the others may be waiting for this for a long time)
    bar = Progress(None, "tokenising", enabled=progress, unit="conv")
    for row_ids, row_mask in sft_rows(records, chat, max_len, truncation, stats):
        ids.extend(row_ids)
        mask.extend(row_mask)
        offsets.append(len(ids))
        if len(offsets) % 100 == 1:
            bar.update(100, rate(len(ids), time.time() - t0, "tok"))
    bar.update((len(offsets) - 1) % 100)
    bar.close()
    stats.update(tokens=len(ids), seconds=round(time.time() - t0, 3))
    return TokenizedSet(np.frombuffer(ids, dtype=np.int32), np.frombuffer(mask, dtype=np.uint8),
                        np.frombuffer(offsets, dtype=np.int64), stats=stats)


def fingerprint(source, split, config, chat, settings):
    """A hex digest of everything the tokenised dataset depends on (see the module docstring)."""
    h = hashlib.sha256(json.dumps([FORMAT, str(source), split, config, chat.default_system, settings]).encode())
    files, repo = data_files(source, split, config)
    if repo is None:
        for name in files:
            st = os.stat(name)
            h.update(json.dumps([str(Path(name).resolve()), st.st_size, st.st_mtime_ns]).encode())
    else:
        h.update(json.dumps([repo, files, data_module.hub_commit(repo)]).encode())  # offline: the cached one's
    h.update(chat.tokenizer.to_str().encode())
    for module in (chat_module, data_module):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:20]


def sft_dataset(source, split, config, chat, max_len, truncation, cache_dir, is_builder=True, poll_s=0.5):
    """The tokenised SFT dataset of `source`, from the cache when there (and sound), else built and cached.

    With several processes every rank calls it, with is_builder=(local rank == 0): the builder takes the build lock
    while every rank agrees that all is well so far (rundir.together: a fingerprint that fails on one rank stops
    every rank with its line); then the builder builds while the others poll for the finished cache, and if the
    builder stops without finishing it (its lock is free, no cache), they stop too. cache_dir None: build in memory.
    """
    if cache_dir is None:
        return build_sft(read_records(source, split, config), chat, max_len, truncation, progress=is_builder)
    with together():
        path = Path(cache_dir) / f"sft-{fingerprint(source, split, config, chat, [max_len, truncation])}"
        lock = BuildLock(path) if is_builder else None
    free_since, said = None, False
    try:
        while True:
            try:
                return TokenizedSet.load(path, chat.vocab_size)
            except ValueError as e:
                damage = e if path.exists() else None
            if lock is not None and lock.take():  # the builder, and no other process is building this cache
                if damage is not None:
                    print(f"token cache damaged ({damage}): rebuilding it", flush=True)
                    _discard(path)
                _remove_leftovers(path.parent)
                print(f"tokenising {source} once into {path}" + (" (the other ranks on this node wait for it)"
                                                               if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1
                                                               else ""), flush=True)
                build_sft(read_records(source, split, config), chat, max_len, truncation).save(path)
                return TokenizedSet.load(path, chat.vocab_size)
            if lock is not None and not said:
                print(f"waiting for another process that is building {path}", flush=True)
                said = True
            if lock is None and BuildLock.is_free(path):  # give a builder that lost a race a few polls to take it
                free_since = free_since or time.time()
                if time.time() - free_since > 10 * poll_s:
                    raise InputError(f"the token cache {path} was not finished: local rank 0, which was building "
                                     f"it, stopped (see its error)")
            else:
                free_since = None
            time.sleep(poll_s)
    finally:
        if lock is not None:
            lock.release()


class BuildLock:
    """<cache_dir>/.<name>.lock, held (fcntl.flock) by the process building <name>. The OS drops it when that
    process exits or dies, so "free and no cache" means no one is building it any more."""

    def __init__(self, path):
        self.file, self.fd = path.with_name(f".{path.name}.lock"), None
        self.take()  # now, before the ranks agree: from then on a free lock means the builder is gone

    def take(self):
        """Try to hold it (not waiting: another process may be building the same cache): held or not."""
        if self.fd is None:
            with disk_errors(self.file):
                self.file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
            else:
                self.fd = fd
        return self.fd is not None

    def release(self):
        if self.fd is not None:
            self.file.unlink(missing_ok=True)  # removed while held: no one else holds it now
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def is_free(path):
        try:
            fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)


def _me():
    """host-pid: names a temporary dir so that the next build knows whether its maker is still alive."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _discard(path):
    """Move a damaged cache out of the way (one rename), then remove it."""
    aside = path.with_name(f".{path.name}.damaged-{_me()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


LEFTOVER = re.compile(r"\.sft-.+\.(?:tmp|damaged)-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def _remove_leftovers(cache_dir):
    """Remove the temporary dirs that builds killed on this host left (their process is gone)."""
    for p in Path(cache_dir).iterdir():
        m = LEFTOVER.fullmatch(p.name)
        if m and m["host"] in (None, socket.gethostname()) and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)

