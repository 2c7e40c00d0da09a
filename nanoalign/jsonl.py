"""JSONL outputs that survive a kill: rows are appended and flushed as they are made, and a restarted job reads
back what is there (dropping a torn last line) to skip work already done."""
import json
import os
from pathlib import Path

from nanoalign.errors import InputError


def jsonl_lines(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path, rows):
    """Write rows as JSONL, atomically: a reader (or a killed run) never sees half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(jsonl_lines(rows))
    os.replace(tmp, path)
    return path


def read_jsonl(path):
    """All rows of a JSONL file; a malformed line is an error naming file and line."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
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
        with self.path.open("a") as f:
            f.write(jsonl_lines(rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)

    def rewrite(self, rows):
        """Replace the file's contents (used to drop an incomplete group of rows before redoing it)."""
        write_jsonl(self.path, rows)
        self.rows = list(rows)
