"""JSONL outputs that survive a kill: rows are appended and flushed as they are made, and a restarted job reads
back what is there to skip work already done; under torchrun every rank appends to a part file of its own and
rank 0 merges the parts at the end.

Reading back follows one rule (parse_rows): the bytes after the last newline are a row a kill cut off (maybe inside
a UTF-8 character) and are left out; a line that is not UTF-8, not JSON, or not the row the writer writes (a
`check`, e.g. has_fields) is damaged: dropped with one line naming the file, line and count, and its work redone."""
import json
import os
import time
from pathlib import Path

from nanoalign.errors import InputError
from nanoalign.rundir import atomic_path, disk_errors, write_text


def jsonl_lines(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path, rows):
    """Write rows as JSONL, atomically: a reader (or a killed run) never sees half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, jsonl_lines(rows))
    return path


def read_json(path) -> dict:
    """One JSON object (config.json and the like); malformed JSON, or a document that is no object (a list, a
    string), is an error naming the file (and line)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object {{...}}, found {type(obj).__name__} {json.dumps(obj)[:60]}")
    return obj


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


# -----------------------------------------------------------------------------
# Reading back what a killed run wrote

def has_fields(fields=None):
    """A row check for parse_rows: the row is a JSON object holding each of `fields` ({name: a type, a tuple of
    types, or a function value -> bool}, e.g. {"prompt_id": str, "score": endpoint.is_score}) with a value of that
    type, or one the function accepts: what a fresh row would hold. check(row) returns what is wrong, or None."""
    def check(row):
        if not isinstance(row, dict):
            return f"a JSON {type(row).__name__}, not an object"
        for name, want in (fields or {}).items():
            if name not in row:
                return f"no field {name!r}"
            value = row[name]
            if isinstance(want, (type, tuple)) and not isinstance(value, want):
                return f"field {name!r} holds a {type(value).__name__}"
            if not isinstance(want, (type, tuple)) and not want(value):
                return f"field {name!r} holds {value!r}"
        return None
    return check


def parse_rows(data: bytes, check=has_fields()):
    """The rows of JSONL bytes that a writer may have been killed in: (rows, their lines as bytes, damaged).

    Everything after the last newline is a row cut off by a kill (maybe inside a UTF-8 character): left out. A line
    that is not UTF-8, not JSON, or that check(row) finds wrong is damaged: left out and listed in `damaged` as
    (line number, what is wrong). Blank lines are skipped."""
    rows, lines, damaged = [], [], []
    for i, line in enumerate(data[:data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            why = f"not UTF-8 (byte {e.start + 1})"
        except json.JSONDecodeError as e:
            why = f"not JSON ({e.msg}, column {e.colno})"
        else:
            why = check(row)
        if why:
            damaged.append((i, why))
        else:
            rows.append(row)
            lines.append(line + b"\n")
    return rows, lines, damaged


def say_damaged(path, damaged, then=""):
    """One line for the damaged rows parse_rows found in `path`, if any; `then` says what becomes of their work."""
    if damaged:
        (first, why), n = damaged[0], len(damaged)
        shown = ", ".join(str(i) for i, _ in damaged[:10]) + (", ..." if n > 10 else "")
        print(f"{path}:{first}: {why}: dropped {n} damaged row{'s' * (n > 1)} (line{'s' * (n > 1)} {shown})"
              + (f"; {then}" if then else ""), flush=True)


def drop_torn_tail(path) -> bytes:
    """Cut a last line without its newline (a row torn by a kill) from the file, in place (os.truncate): a reader
    at any moment sees the same whole rows, which parse_rows reads the same before and after. Returns the bytes
    kept. Only the file's one writer may call this, before it appends."""
    data = Path(path).read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        os.truncate(path, keep)
    return data[:keep]


def append_rows(path, rows):
    """Append rows in one call and fsync: a row is on disk once this returns."""
    if rows:
        with disk_errors(path), open(path, "a", encoding="utf-8") as f:
            f.write(jsonl_lines(rows))
            f.flush()
            os.fsync(f.fileno())


class ResumableJsonl:
    """An append-only JSONL file with one writer. On open, rows already written are read back into `rows`: a last
    line cut off by a kill is cut from the file, damaged rows (parse_rows, with `check`) are dropped from it with one
    line naming them, so nothing is half-counted and nothing duplicated."""

    def __init__(self, path, check=has_fields()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if self.path.exists():
            self.rows, lines, damaged = parse_rows(drop_torn_tail(self.path), check)
            if damaged:
                say_damaged(self.path, damaged)
                with atomic_path(self.path) as tmp:
                    Path(tmp).write_bytes(b"".join(lines))

    def append(self, rows):
        """Write rows in one call and fsync: a row is on disk once this returns."""
        append_rows(self.path, rows)
        self.rows.extend(rows)

    def rewrite(self, rows):
        """Replace the file's contents (used to drop an incomplete group of rows before redoing it)."""
        write_jsonl(self.path, rows)
        self.rows = list(rows)


class ShardedJsonl:
    """One append-only JSONL output written by `world` ranks at once, resumable whatever the world size.

    Every rank reads back what earlier runs left (the merged file and every part file, by parse_rows: torn last
    lines and damaged rows left out, the damage named once, by rank 0) into `rows`; every rank gets the same rows
    whatever the timing, since the only write before the script's barrier is each owner cutting the torn tail of
    its own part in place. Rank r then appends to its own `<name>.part<r>-of-<world>.jsonl` and, when its share is
    done, leaves a `.done` marker; rank 0 waits for every marker and merges all rows into `<name>` (atomically, in
    a given order, one row per key: the last one written), then deletes the parts. A kill at any point loses only
    the rows not yet appended.

    Args:
        path: the merged file, e.g. out/samples.jsonl.
        key: row -> hashable identity, e.g. (prompt_id, sample).
        check: what a whole row must be (has_fields: the fields the writer writes and `key` reads); a row that
            fails it is damaged, so its work is redone.
    """

    def __init__(self, path, key, rank=0, world=1, check=has_fields()):
        self.path, self.key, self.rank, self.world, self.check = Path(path), key, rank, world, check
        self.part_path = self.path.with_name(f"{self.path.stem}.part{rank}-of-{world}.jsonl")
        self.marker = self.part_path.with_suffix(".done")
        self.marker.unlink(missing_ok=True)
        if self.part_path.exists():
            drop_torn_tail(self.part_path)
        self.rows = self._read_all(say=rank == 0)

    def _parts(self):
        return sorted(self.path.parent.glob(f"{self.path.stem}.part*-of-*.jsonl"))

    def _read_all(self, say=False):
        found = {}
        for f in [self.path] * self.path.exists() + self._parts():
            rows, _, damaged = parse_rows(f.read_bytes(), self.check)
            if say:
                say_damaged(f, damaged, "their work is redone")
            for row in rows:
                found[self.key(row)] = row
        return list(found.values())

    def append(self, rows):
        append_rows(self.part_path, rows)

    def finish(self, order, poll_s=0.5):
        """This rank's share is done. On rank 0: wait for the others, merge and return every row sorted by
        order(row); on other ranks: None."""
        with disk_errors(self.marker):
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
