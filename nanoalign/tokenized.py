"""Tokenise once: SFT datasets as flat arrays on disk, built by one process and memory-mapped by every rank.

    ds = sft_dataset("HuggingFaceTB/smol-smoltalk", "train", None, chat, 2048, "drop", cache_dir, is_builder)
    ds[i]["ids"], ds[i]["mask"]       # numpy views of example i (int32 ids, uint8 mask)
    train = ds.subset(train_indices)  # same arrays, another index

On disk, <cache_dir>/sft-<fingerprint>/ holds ids.npy [tokens] int32, mask.npy [tokens] uint8, offsets.npy
[n + 1] int64 and stats.json. The fingerprint covers the data files (path, size, mtime; a hub dataset's commit),
the tokenizer (its whole tokenizer.json), the default system prompt, the rendering code (chat.py, data.py) and the
settings (max_len, truncation), so any change rebuilds and a rerun or another rank only loads. The directory is
written under a temporary name and renamed into place: a killed build leaves no half cache behind. Loaded with
mmap, the token arrays live once in the page cache, shared by all ranks on a node: 5 bytes a token, against
~49 bytes a token in every rank for Python lists of ints.
"""
import hashlib
import json
import os
import shutil
import time
from array import array
from pathlib import Path

import numpy as np

from nanoalign import chat as chat_module
from nanoalign import data as data_module
from nanoalign.data import data_files, read_records, sft_rows

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
        """Write atomically: a temporary sibling dir, renamed into place (a finished cache is never overwritten)."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("ids", "mask", "offsets"):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        (tmp / "stats.json").write_text(json.dumps(self.stats) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished the same cache first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out_dir / "stats.json").exists():
                raise

    @classmethod
    def load(cls, path):
        path = Path(path)
        arrays = [np.load(path / f"{name}.npy", mmap_mode="r") for name in ("ids", "mask", "offsets")]
        return cls(*arrays, stats=json.loads((path / "stats.json").read_text()))


def build_sft(records, chat, max_len, truncation, progress=True):
    """Render every row (sft_rows) straight into growing flat buffers, with a progress bar: a TokenizedSet."""
    from tqdm import tqdm

    ids, mask, offsets, stats = array("i"), bytearray(), array("q", [0]), {}
    t0 = time.time()
    # disable=None: a bar on a terminal, nothing in logs (the stats printed after carry tokens and seconds)
    with tqdm(desc="tokenising", unit=" conv", disable=None if progress else True, mininterval=1.0) as bar:
        for row_ids, row_mask in sft_rows(records, chat, max_len, truncation, stats):
            ids.extend(row_ids)
            mask.extend(row_mask)
            offsets.append(len(ids))
            bar.update()
            if bar.n % 1000 == 0:
                bar.set_postfix(tok_s=f"{len(ids) / max(time.time() - t0, 1e-9) / 1e3:.0f}k", refresh=False)
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


def sft_dataset(source, split, config, chat, max_len, truncation, cache_dir, is_builder=True, barrier=None):
    """The tokenised SFT dataset of `source`, from the cache when there, else built (by `is_builder`) and cached.

    With several processes: pass is_builder=(local rank == 0) and barrier=torch.distributed.barrier; the others
    wait at the barrier, then load what the builder wrote. cache_dir None: build in memory, no cache.
    """
    if cache_dir is None:
        return build_sft(read_records(source, split, config), chat, max_len, truncation, progress=is_builder)
    path = Path(cache_dir) / f"sft-{fingerprint(source, split, config, chat, [max_len, truncation])}"
    if is_builder and not (path / "stats.json").exists():
        build_sft(read_records(source, split, config), chat, max_len, truncation).save(path)
    if barrier is not None:
        barrier()
    return TokenizedSet.load(path)
