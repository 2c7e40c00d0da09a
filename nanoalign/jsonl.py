"""JSONL outputs that survive a kill: rows are appended and flushed as they are made, and a restarted job reads
back what is there (dropping a torn last line) to skip work already done; under torchrun every rank appends to a
part file of its own and rank 0 merges the parts at the end."""
import json
import os
import time
from pathlib import Path

from nanoalign.errors import InputError
from nanoalign.rundir import disk_errors, write_text


def jsonl_lines(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path, rows):
    """Write rows as JSONL, atomically: a reader (or a killed run) never sees half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, jsonl_lines(rows))
    return path


def read_json(path):
    """One JSON document (config.json and the like); malformed JSON is an error naming the file and line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def write_json(path, obj):
    """Write obj as indented JSON, atomically; NaN or inf anywhere is an error (it is not JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


def read_jsonl(path, torn_ok=False):
    """All rows of a JSONL file; a malformed line is an error naming file and line. torn_ok: a last line without
    its newline (a writer killed, or still writing) is left out instead."""
    with open(path) as f:
        lines = f.readlines()
    if torn_ok and lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: malformed JSON: {e}") from None
    return rows


class ResumableJsonl:
    """An append-only JSONL file. On open, rows already written are read back into `rows`; a last line cut off by
    a kill (no trailing newline) is dropped from the file, so nothing is half-counted and nothing duplicated."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data[:data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                self.path.write_bytes(keep)
            self.rows = read_jsonl(self.path)

    def append(self, rows):
        """Write rows in one call and fsync: a row is on disk once this returns."""
        if not rows:
            return
        with disk_errors(self.path), self.path.open("a") as f:
            f.write(jsonl_lines(rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)

    def rewrite(self, rows):
        """Replace the file's contents (used to drop an incomplete group of rows before redoing it)."""
        write_jsonl(self.path, rows)
        self.rows = list(rows)


class ShardedJsonl:
    """One append-only JSONL output written by `world` ranks at once, resumable whatever the world size.

    Every rank reads back what earlier runs left (the merged file and every part file, torn last lines left out)
    into `rows`; rank r then appends to its own `<name>.part<r>-of-<world>.jsonl` and, when its share is done,
    leaves a `.done` marker; rank 0 waits for every marker and merges all rows into `<name>` (atomically, in a
    given order, one row per key: the last one written), then deletes the parts. A kill at any point loses
    only the rows not yet appended.

    Args:
        path: the merged file, e.g. out/samples.jsonl.
        key: row -> hashable identity, e.g. (prompt_id, sample).
    """

    def __init__(self, path, key, rank=0, world=1):
        self.path, self.key, self.rank, self.world = Path(path), key, rank, world
        self.part_path = self.path.with_name(f"{self.path.stem}.part{rank}-of-{world}.jsonl")
        self.marker = self.part_path.with_suffix(".done")
        self.marker.unlink(missing_ok=True)
        self.rows = self._read_all()
        self.part = ResumableJsonl(self.part_path)

    def _parts(self):
        return sorted(self.path.parent.glob(f"{self.path.stem}.part*-of-*.jsonl"))

    def _read_all(self):
        found = {}
        for f in [self.path] * self.path.exists() + self._parts():
            for row in read_jsonl(f, torn_ok=True):
                found[self.key(row)] = row
        return list(found.values())

    def append(self, rows):
        self.part.append(rows)

    def finish(self, order, poll_s=0.5):
        """This rank's share is done. On rank 0: wait for the others, merge and return every row sorted by
        order(row); on other ranks: None."""
        self.marker.write_text("")
        if self.rank != 0:
            return None
        markers = [self.path.with_name(f"{self.path.stem}.part{r}-of-{self.world}.done") for r in range(self.world)]
        while not all(m.exists() for m in markers):
            time.sleep(poll_s)
        rows = sorted(self._read_all(), key=order)
        write_jsonl(self.path, rows)
        for f in self._parts() + markers:
            f.unlink(missing_ok=True)
        self.rows = rows
        return rows
