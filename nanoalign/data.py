"""Datasets: read rows, render them into token ids + loss masks, mix, split, shard and batch.

Rows come from a local .jsonl / .json / .parquet file, a local directory of such files, or a hub dataset
(e.g. HuggingFaceTB/smol-smoltalk, HuggingFaceH4/ultrafeedback_binarized split train_prefs). Every row
travels with a `where` string ("data.jsonl:12") so that every error names the file and line it came from.

Masks are built while rendering (chat.render), never from `ids != pad`: on Qwen base models pad == eos.
"""

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import torch

from nanoalign.errors import InputError

DATA_EXTS = (".parquet", ".jsonl", ".json")

# -----------------------------------------------------------------------------
# reading rows


def read_records(source, split="train", config=None):
    """(where, row) for every row of a dataset, read lazily; a bad source fails here, at the call.

    Args:
        source: a .jsonl/.json/.parquet file, a directory, or a hub dataset id ("owner/name").
        split: for a directory or hub id, the split whose files are read (see select_files).
        config: for a directory or hub id, the config folder (e.g. "all" for HuggingFaceTB/smoltalk).
    Returns:
        iterator of (where, row): where is "path:line" for JSONL (1-based line), "path:index" for a JSON list
        (0-based index), "path:row N" for parquet (0-based row); row is a dict. Hub files are named
        "owner/name/path/in/repo".
    Raises:
        FileNotFoundError: source is neither an existing path nor a reachable hub dataset.
        ValueError: no files for the split (lists the splits); while iterating: malformed JSON (names file
        and line), a row that is not an object.
    """
    files, repo = data_files(source, split, config)
    if any(name.endswith(".parquet") for name in files):
        _pyarrow_parquet()  # fail now, not after downloading gigabytes
    return _rows(files, repo)


def data_files(source, split="train", config=None):
    """(files, repo) that read_records reads: local paths (repo None), or paths inside hub dataset `repo`."""
    path, repo = Path(source), None
    if path.is_file():
        if not path.name.endswith(DATA_EXTS):
            raise InputError(f"{path}: unsupported file type (want one of {', '.join(DATA_EXTS)})")
        files = [str(path)]
    elif path.is_dir():
        rel = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = [str(path / name) for name in select_files(rel, split, config, source=str(path))]
    elif _is_hub_id(str(source)):
        repo = str(source)
        files = _list_hub_files(repo, split, config)
    else:
        raise FileNotFoundError(f"no such file or directory: {source}")
    return files, repo


def _is_hub_id(s):
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.endswith(DATA_EXTS) and not s.startswith((".", "~"))


def _list_hub_files(repo, split, config):
    """One split's files of hub dataset `repo`: as the hub lists them, or, with HF_HUB_OFFLINE=1 (no network call)
    or when the hub cannot list them, as its snapshot in the local hub cache holds them (hf_hub_download then reads
    them there)."""
    listing, error = None, None
    if not _hub_offline():
        from huggingface_hub import list_repo_files
        try:
            listing, source = list_repo_files(repo, repo_type="dataset"), repo
        except Exception as e:  # offline, missing repo, auth: the cache, else one line
            error = e
    if listing is None:
        snapshot = _cached_snapshot(repo, error)
        listing = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        source = f"{repo} (hub cache, commit {snapshot.name[:12]})"
        if error is not None:
            print(f"could not reach the hub ({type(error).__name__}): reading {source}", flush=True)
    return select_files(listing, split, config, source=source)


def hub_commit(repo):
    """The commit of hub dataset `repo` that read_records reads (tokenise-once caches key on it): the hub's main,
    or its snapshot's in the local hub cache, with no network call, when _list_hub_files lists that."""
    error = None
    if not _hub_offline():
        from huggingface_hub import HfApi
        try:
            return HfApi().dataset_info(repo).sha
        except Exception as e:
            error = e
    return _cached_snapshot(repo, error).name


def _hub_offline():
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE


def _cached_snapshot(repo, online_error=None) -> Path:
    """The snapshot dir of hub dataset `repo` (its refs/main) in the local hub cache, or one line saying why not."""
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception as e:
        if getattr(e, "snapshot_path", None):  # IncompleteSnapshotError: only some files cached (e.g. one split)
            return Path(e.snapshot_path)
    if online_error is not None:
        msg = (str(online_error).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"no local path {repo!r} and could not list hub dataset {repo!r}: "
                                f"{type(online_error).__name__}: {msg}") from None
    raise FileNotFoundError(f"no local path {repo!r}, and hub dataset {repo!r} is not in the hub cache "
                            f"({constants.HF_HUB_CACHE}), which is all HF_HUB_OFFLINE=1 allows: download it once "
                            f"where the hub can be reached (`hf download {repo} --repo-type dataset`)")


def _rows(files, repo=None):
    """Rows of local files, or of a hub repo's files (downloaded, cached, one at a time as they are reached)."""
    for name in files:
        if repo is None:
            yield from _read_file(name, name)
        else:
            from huggingface_hub import hf_hub_download
            yield from _read_file(hf_hub_download(repo, name, repo_type="dataset"), f"{repo}/{name}")


def _read_file(path, name):
    yield from _read_parquet(path, name) if name.endswith(".parquet") else _read_json(path, name)


def _read_json(path, name):
    """JSON lines, or one JSON list of rows (a .json file may hold either; the first character decides)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if not head:
            raise InputError(f"{name}: empty file (no rows)")
        f.seek(0)
        if head.startswith(b"["):
            data = f.read()
            try:
                rows = json.loads(_utf8(data, name, lambda e: data[:e.start].count(b"\n") + 1))
            except json.JSONDecodeError as e:
                raise InputError(f"{name}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            for i, row in enumerate(rows):
                yield _check_row(f"{name}:{i}", row)
            return
        n = 0
        for lineno, line in enumerate(f, start=1):
            line = _utf8(line, name, lambda e: lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == 0 and line.lstrip().startswith("{"):
                    _one_object_over_lines(path, name)
                raise InputError(f"{name}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            n += 1
            yield _check_row(f"{name}:{lineno}", row)
    if n == 0:
        raise InputError(f"{name}: only blank lines (no rows)")


def _utf8(data: bytes, name, lineno):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}:{lineno(e)}: not UTF-8 text (byte {data[e.start]:#04x}); re-save the file as "
                         f"UTF-8") from None


def _one_object_over_lines(path, name):
    """A pretty-printed JSON object where JSONL wants one object per line: say that, not 'EOF while parsing'."""
    try:
        whole = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        raise InputError(f"{name}: one JSON object spread over several lines; JSON lines need one object per line "
                         f"(or a .json file holding a list of objects)")


def _read_parquet(path, name):
    n = 0
    for rows in _parquet_batches(path, name):
        for row in rows:
            yield _check_row(f"{name}:row {n}", row)
            n += 1


def _parquet_batches(path, name):
    """The rows of a parquet file, 1024 at a time; a file pyarrow cannot read is one line naming it."""
    import pyarrow

    pq, n = _pyarrow_parquet(), 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            rows = batch.to_pylist()
            n += len(rows)
            yield rows
    except (pyarrow.ArrowException, OSError) as e:  # not parquet, cut short, a corrupt page
        where, msg = f" after row {n - 1}" if n else "", (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{name}: not a readable parquet file{where} ({msg})") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install nanoalign[parquet]") from None
    return pq


def _check_row(where, row):
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    return where, row


def _split_config(name):
    """'data/train_prefs-00000-of-00001-1a2b.parquet' -> ('train_prefs', None); 'all/train-0-of-4.parquet'
    -> ('train', 'all'); 'default/test/0000.parquet' -> ('test', 'default'); 'train.jsonl' -> ('train', None)."""
    *dirs, base = name.split("/")
    split = base.rsplit(".", 1)[0].split("-")[0]
    if split.isdigit() and dirs:  # "<config>/<split>/0000.parquet" layout
        split = dirs.pop()
    config = "/".join(d for d in dirs if d != "data") or None
    return split, config


def select_files(files, split, config=None, source="dataset"):
    """Pick a dataset's data files for one split (a pure function of the file list, no network).

    A file's split is its name up to the first "-" ("train_prefs-00000-of-00001.parquet" -> train_prefs,
    "test.jsonl" -> test), or its folder when the name is a number ("default/train/0000.parquet"). Its config is
    its folder, ignoring a "data" folder ("all/train-...", "data/all/train-..." -> all). With config=None,
    files outside any config folder are used; if there are none, the only config; several -> error.
    Parquet wins over JSON when a split has both.

    Args:
        files: paths inside the repo or directory ("data/train-00000-of-00004.parquet").
    Returns:
        sorted list of the chosen paths.
    Raises:
        ValueError: no data files, unknown or ambiguous config, or no files for the split (lists the splits).
    """
    data = [(f, *_split_config(f)) for f in files if f.endswith(DATA_EXTS)]
    if not data:
        raise InputError(f"{source}: no data files ({', '.join(DATA_EXTS)}) among {len(files)} files")
    configs = sorted({c for _, _, c in data if c is not None})
    if config is None and all(c is not None for _, _, c in data):
        if len(configs) > 1:
            raise InputError(f"{source}: pick a config, one of: {', '.join(configs)}")
        config = configs[0]
    elif config is not None and config not in configs:
        raise InputError(f"{source}: no config {config!r}; configs: {', '.join(configs) or '(none)'}")
    data = [(f, s) for f, s, c in data if c == config]
    chosen = sorted(f for f, s in data if s == split)
    if not chosen:
        splits = sorted({s for _, s in data})
        where = f"{source} (config {config})" if config else source
        raise InputError(f"{where}: no files for split {split!r}; splits: {', '.join(splits)}")
    parquet = [f for f in chosen if f.endswith(".parquet")]
    return parquet or chosen


# -----------------------------------------------------------------------------
# rendering rows into examples


def _messages(value, field, where):
    """Check a list of {role, content} dicts; error names the row and field."""
    ok = isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok:
        got = "missing" if value is None else f"got {type(value).__name__} {str(value)[:80]!r}"
        raise InputError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} "
                         f"messages ({got})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _named(where, fn, *args):
    """fn(*args), with `where` put in front of the message of an InputError (e.g. chat's unknown role)."""
    try:
        return fn(*args)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _file(where):
    return where.rsplit(":", 1)[0]  # "a.jsonl:3" -> "a.jsonl", "b.parquet:row 7" -> "b.parquet"


def sft_examples(records, chat, max_len, truncation="drop"):
    """Render chat rows ({"messages": [{role, content}, ...]}) into SFT examples.

    Args:
        records: iterable of (where, row), e.g. read_records(...).
        chat: nanoalign.chat.Chat; ids, mask = chat.render(messages) (mask 1 on assistant content + <|im_end|>).
        max_len: longest example in tokens.
        truncation: "drop" drops longer examples, "cut" keeps their first max_len tokens.
    Returns:
        (examples, stats): examples are {"ids": list[int], "mask": list[int]}; stats counts kept,
        dropped_too_long, dropped_no_assistant_tokens (mask all zero, e.g. cut before the reply) and cut
        (cut examples that were kept, a subset of kept). kept + dropped_* == rows read.
    Raises:
        ValueError: a row without a valid `messages` field (names where), or no usable example at all.
    """
    stats = {}
    examples = [{"ids": ids, "mask": mask} for ids, mask in sft_rows(records, chat, max_len, truncation, stats)]
    return examples, stats


def sft_rows(records, chat, max_len, truncation, stats):
    """Yield the (ids, mask) lists of sft_examples one at a time; fills `stats` (same keys) as it goes and
    raises its InputError at the end when nothing was kept."""
    if truncation not in ("drop", "cut"):
        raise InputError(f"--truncation must be 'drop' or 'cut', got {truncation!r}")
    files = set()
    stats.update(kept=0, dropped_too_long=0, cut=0, dropped_no_assistant_tokens=0)
    for where, row in records:
        files.add(_file(where))
        ids, mask = _named(where, chat.render, _messages(row.get("messages"), "messages", where))
        assert len(ids) == len(mask), f"{where}: chat.render gave {len(ids)} ids but {len(mask)} mask values"
        was_cut = len(ids) > max_len
        if was_cut and truncation == "drop":
            stats["dropped_too_long"] += 1
            continue
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            stats["dropped_no_assistant_tokens"] += 1
            continue
        stats["cut"] += was_cut
        stats["kept"] += 1
        yield ids, mask
    if not stats["kept"]:
        raise InputError(f"no usable examples in {', '.join(sorted(files)) or '(no rows)'} ({stats})")


def _response(value, field, where):
    """A response given as a string, or as a message list ending in the assistant reply.
    Returns (text, prompt messages before it or None)."""
    if isinstance(value, str):
        return value, None
    msgs = _messages(value, field, where)
    if msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: field {field!r}: last message must be the assistant response, "
                         f"got role {msgs[-1]['role']!r}")
    return msgs[-1]["content"], msgs[:-1] or None


def _finished(row, field, where):
    """`chosen_finished` / `rejected_finished` (gen_synthetic.py writes them): False for an answer cut at the token
    limit. Absent: finished (human data)."""
    value = row.get(f"{field}_finished", True)
    if not isinstance(value, bool):
        raise InputError(f"{where}: field '{field}_finished' must be true or false, got {value!r}")
    return value


def _pair(row, where):
    """-> (prompt messages, chosen text, rejected text) from a UltraFeedback-style or plain-string row."""
    for field in ("chosen", "rejected"):
        if field not in row:
            raise InputError(f"{where}: missing field {field!r} (preference rows need prompt, chosen, rejected)")
    chosen, chosen_prefix = _response(row["chosen"], "chosen", where)
    rejected, rejected_prefix = _response(row["rejected"], "rejected", where)
    if chosen_prefix and rejected_prefix and chosen_prefix != rejected_prefix:
        raise InputError(f"{where}: 'chosen' and 'rejected' continue different conversations")
    prompt = chosen_prefix or rejected_prefix
    if prompt is None:
        p = row.get("prompt")
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = _messages(p, "prompt", where)
    return prompt, chosen, rejected


def preference_examples(records, chat, max_len, max_prompt_len):
    """Render preference rows into {"prompt", "chosen", "rejected"} token-id lists.

    Rows: UltraFeedback-binarized form (`chosen`/`rejected` are message lists whose last message is the
    assistant response and whose earlier messages are the prompt conversation; `prompt` is used when they
    have none), or plain strings (`prompt`, `chosen`, `rejected`; `prompt` may also be a message list).
    `chosen_finished` / `rejected_finished` false (an answer cut at the sampler's token limit) render that response
    without its <|im_end|>. Other fields (scores, ids) are ignored.

    Truncation, like TRL: the prompt keeps its last max_prompt_len tokens, then each response keeps its first
    max_len - len(prompt) tokens (a cut response loses its <|im_end|>).

    Args:
        records: iterable of (where, row).
        chat: nanoalign.chat.Chat (render_prompt includes the generation prompt; render_response ends in <|im_end|>
            when the response finished).
    Returns:
        (examples, stats): stats counts kept, dropped_identical (chosen == rejected, before or after
        truncation), prompt_cut and response_cut (kept pairs whose prompt / a response was cut).
    """
    if not 0 < max_prompt_len < max_len:
        raise InputError(f"need 0 < --max-prompt-len ({max_prompt_len}) < --max-len ({max_len})")
    examples, files = [], set()
    stats = dict(kept=0, dropped_identical=0, prompt_cut=0, response_cut=0)
    for where, row in records:
        files.add(_file(where))
        prompt, chosen, rejected = _pair(row, where)
        p = _named(where, chat.render_prompt, prompt)
        c = chat.render_response(chosen, _finished(row, "chosen", where))
        r = chat.render_response(rejected, _finished(row, "rejected", where))
        prompt_cut = len(p) > max_prompt_len
        p = p[-max_prompt_len:]  # keep the end: the question and the generation prompt
        room = max_len - len(p)
        response_cut = max(len(c), len(r)) > room
        c, r = c[:room], r[:room]
        if c == r:  # same text, or the same start cut short: no preference signal left
            stats["dropped_identical"] += 1
            continue
        stats["prompt_cut"] += prompt_cut
        stats["response_cut"] += response_cut
        examples.append({"prompt": p, "chosen": c, "rejected": r})
    stats["kept"] = len(examples)
    if not examples:
        raise InputError(f"no usable examples in {', '.join(sorted(files)) or '(no rows)'} ({stats})")
    return examples, stats


# -----------------------------------------------------------------------------
# mixing, holding out, sharding


def prompt_records(records, max_prompts=None, check=None):
    """Prompts for sampling: [(prompt_id, messages)] from rows with a `prompt` (string or message list) or
    `messages` (the conversation up to its last user turn, as in UltraFeedback's *_gen splits).

    prompt_id is the row's own `prompt_id` when it has one, else a hash of the messages: stable across runs,
    which is what resuming and the reward cache key on. A prompt seen twice is used once. `check(messages)`, if
    given, runs on every prompt kept (e.g. reward.prompt_check: can the reward grade it?); its InputError is
    raised again with the prompt's file:line in front.
    """
    prompts, seen, duplicates = [], set(), 0
    for where, row in records:
        if isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        elif row.get("prompt") is not None:
            messages = _messages(row["prompt"], "prompt", where)
        else:
            messages = _messages(row.get("messages"), "messages", where)
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                raise InputError(f"{where}: field 'messages' has no user turn to answer")
            messages = messages[:last_user + 1]
        key = row.get("prompt_id") or hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        if str(key) in seen:
            duplicates += 1
            continue
        seen.add(str(key))
        if check is not None:
            _named(where, check, messages)
        prompts.append((str(key), messages))
        if max_prompts and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise InputError("no prompts found")
    if duplicates:
        print(f"prompts: dropped {duplicates} duplicate(s) (a prompt_id, or a prompt without one, seen before)")
    return prompts


def mix(example_lists, weights, seed):
    """Mix sources: source i contributes round(weights[i] * len(source i)) examples.

    A weight is a multiplier on the source's own size: 1.0 = every example once, 0.5 = a random half,
    2.0 = every example twice, 1.5 = everything once plus a random half (never a duplicate within one
    fractional draw). The result is concatenated and shuffled; all randomness comes from `seed`.
    """
    assert len(example_lists) == len(weights), "one weight per source"
    rng = random.Random(seed)
    out = []
    for examples, w in zip(example_lists, weights):
        if not w >= 0:
            raise InputError(f"--data-weights must be >= 0, got {w}")
        count = round(w * len(examples))
        full, rest = divmod(count, len(examples)) if examples else (0, 0)
        out += list(examples) * full + rng.sample(list(examples), rest)
    rng.shuffle(out)
    return out


def split_holdout(examples, frac, seed, key=None):
    """Deterministic (train, eval) split: eval gets round(frac * n) examples (at least 1 when frac > 0),
    chosen at random with `seed`; both keep the input order. A copy of a held-out example (same content:
    key(example), content_key by default) is kept out of train too, so nothing is evaluated on what it trained on."""
    key = key or content_key
    n = len(examples)
    n_eval = max(1, round(frac * n)) if frac > 0 else 0
    if n_eval >= n:
        raise InputError(f"--eval-frac {frac}: a holdout of {n_eval} leaves no training examples out of {n}")
    held = set(random.Random(seed).sample(range(n), n_eval))
    evals = [ex for i, ex in enumerate(examples) if i in held]
    held_content = {key(ex) for ex in evals}
    train = [ex for i, ex in enumerate(examples) if i not in held and not (held and key(ex) in held_content)]
    if not train:  # every training example was a copy of a held-out one
        raise InputError(f"--eval-frac {frac}: the {n_eval} held-out examples and their copies are all {n} examples "
                         f"({len(held_content)} distinct): no training example left; lower --eval-frac")
    return train, evals


def holdout_and_mix(sources, weights, frac, seed):
    """Hold out `frac` of each source, then mix only the train parts (see mix): (train, eval).

    Holding out after mixing would leak: a source upsampled 2x has both copies of a pair in the mix, and the held-out
    one's twin stays in train. Eval holds each held-out pair once, whatever its source's weight; a source of
    weight 0 is left out of both. No train example has the content of an eval one (even across sources).
    """
    assert len(sources) == len(weights), "one weight per source"
    parts = [split_holdout(examples, frac, seed) if w > 0 else ([], []) for examples, w in zip(sources, weights)]
    evals = [ex for _, held in parts for ex in held]
    held_content = {content_key(ex) for ex in evals}
    trains = [[ex for ex in train if content_key(ex) not in held_content] for train, _ in parts]
    return mix(trains, weights, seed), evals


def content_key(example):
    """A hashable stand-in for an example's content: {"ids": ..., "mask": ...} and the like, whose lists become
    tuples and numpy arrays (a tokenised set's views) a 128-bit digest of their bytes; or a plain value. Nested rows
    ({"messages": [{role, content}, ...]}) are taken apart the same way."""
    return _hashable(example)


def _hashable(value):
    if isinstance(value, np.ndarray):
        return hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=16).digest()
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        flat = tuple(value)  # token ids: the common case, one call
        try:
            hash(flat)
            return flat
        except TypeError:
            return tuple(_hashable(v) for v in value)
    return value


def shard(examples, rank, world):
    """This rank's share of an evaluation: examples rank, rank + world, ...

    Shares differ by at most one example and together hold every example (a rank may get none), so sums and counts
    all-reduced over ranks cover the whole set whatever the world size. Only for loops with no collective inside
    (eval, reference precompute); training steps come from step_batches, where every rank runs the same steps.
    """
    assert 0 <= rank < world, f"rank {rank} outside world of {world}"
    return examples[rank::world]


# -----------------------------------------------------------------------------
# batching


def pad_right(seqs, pad_value):
    """list of int lists -> LongTensor [b, max len], right-padded with pad_value."""
    assert len(seqs) > 0, "nothing to pad"
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def batch_indices(lengths, batch_size, seed, epoch, bucket=50):
    """Shuffled, length-bucketed batches of indices for one epoch.

    Shuffle all indices with seed + epoch; in chunks of bucket * batch_size, sort by length and cut into
    batches (rows of a batch have similar lengths, so little compute goes to padding); then shuffle the order
    of the batches so lengths do not climb steadily through each chunk. One batch (from the last chunk) may be
    short when batch_size does not divide len(lengths).
    """
    rng = random.Random(seed + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = bucket * batch_size
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def step_batches(lengths, batch_size, grad_accum, rank, world, seed, start_step=0):
    """Yield, for each optimizer step, forever, this rank's micro-batches (lists of example indices).

    Global batches of batch_size * grad_accum * world examples are cut by `batch_indices` from the WHOLE
    dataset (epoch e shuffled with seed + e); rank r takes its own grad_accum micro-batches of each. So what a
    step trains on does not depend on how it is split: 2 ranks x batch 4 see the batch that 1 rank x batch 8,
    or 1 rank x batch 4 x 2 accumulation steps, sees. A short last global batch is skipped (every rank must
    run the same steps). `start_step` skips that many steps, for resuming.
    """
    global_bs = batch_size * grad_accum * world
    if len(lengths) < global_bs:
        raise InputError(f"{len(lengths)} examples are fewer than one global batch of {global_bs} "
                         f"(--batch-size x --grad-accum x world size)")
    mine = slice(rank * batch_size * grad_accum, (rank + 1) * batch_size * grad_accum)
    step = 0
    for epoch in itertools.count():
        for idx in batch_indices(lengths, global_bs, seed, epoch):
            if len(idx) < global_bs:
                continue
            if step >= start_step:
                part = idx[mine]
                yield [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
            step += 1


def sft_batches(examples, batch_size, pad_id, seed=0, epoch=0, bucket=50):
    """Yield (input_ids [b, t], loss_mask [b, t]) for one epoch of SFT examples (see batch_indices).
    Pads get loss_mask 0; ceil(len(examples) / batch_size) batches."""
    for idx in batch_indices([len(ex["ids"]) for ex in examples], batch_size, seed, epoch, bucket):
        yield (pad_right([examples[i]["ids"] for i in idx], pad_id),
               pad_right([examples[i]["mask"] for i in idx], 0))


def pack(lengths, pack_len, seed):
    """Best-fit-decreasing packing of examples into rows of at most pack_len tokens: list of index lists.

    Longest first (ties in a seeded random order), each into the fullest row it still fits, so rows end up
    nearly full (typically > 95% of tokens real on chat data). Deterministic in (lengths, pack_len, seed).
    """
    assert max(lengths) <= pack_len, f"an example of {max(lengths)} tokens does not fit a row of {pack_len}"
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    rows, by_free = [], [[] for _ in range(pack_len + 1)]  # by_free[c]: rows with c tokens of room left
    count = np.zeros(pack_len + 1, dtype=np.int64)  # len(by_free[c]), to find the tightest fit in one numpy call
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(count[n:])
        if len(fits):
            free = n + int(fits[0])
            r = by_free[free].pop()
            count[free] -= 1
        else:
            free, r = pack_len, len(rows)
            rows.append([])
        rows[r].append(i)
        by_free[free - n].append(r)
        count[free - n] += 1
    return rows


def packed_batch(examples, rows, pack_len, pad_id):
    """Packed rows: the examples of each row concatenated and right-padded to pack_len.

    Returns:
        input_ids [b, pack_len]; loss_mask [b, pack_len]: each example's own mask, except 0 on its first token
        (in a packed row that token follows another document, whose last hidden state must not be trained to
        predict it; unpacked, mask[0] is never used either), 0 on pads; document_ids [b, pack_len]: 0, 1, ...
        per example, the padding tail its own document.
    """
    ids = torch.full((len(rows), pack_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), pack_len), dtype=torch.long)
    docs = torch.empty((len(rows), pack_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc, i in enumerate(row):
            n = len(examples[i]["ids"])
            assert at + n <= pack_len, f"row {r} holds more than {pack_len} tokens"
            ids[r, at:at + n] = torch.tensor(examples[i]["ids"])
            mask[r, at + 1:at + n] = torch.tensor(examples[i]["mask"][1:])
            docs[r, at:at + n] = doc
            at += n
        docs[r, at:] = len(row)
    return ids, mask, docs


def packed_preference_batch(examples, pack_len, pad_id):
    """Chosen and rejected of b pairs as 2b sequences packed into rows of pack_len (pack, packed_batch): padding
    only at each row's end. Sequence j < b is pair j's prompt + chosen, b + j its prompt + rejected (the rows of
    preference_batch).

    Returns:
        input_ids, loss_mask (1 on response tokens), document_ids [rows, pack_len] as packed_batch's, and
        sequence_ids [rows, pack_len]: the sequence of each position, -1 on pads.
    """
    seqs = [{"ids": ex["prompt"] + ex[field], "mask": [0] * len(ex["prompt"]) + [1] * len(ex[field])}
            for field in ("chosen", "rejected") for ex in examples]
    rows = pack([len(s["ids"]) for s in seqs], pack_len, seed=0)
    ids, mask, docs = packed_batch(seqs, rows, pack_len, pad_id)
    table = torch.full((len(rows), max(map(len, rows)) + 1), -1, dtype=torch.long)  # [rows, docs + pad tail]
    for r, row in enumerate(rows):
        table[r, :len(row)] = torch.tensor(row)
    return ids, mask, docs, table.gather(1, docs)


def preference_batch(examples, pad_id):
    """Chosen and rejected of b pairs in one batch, for one forward (one DDP forward per micro-step).

    Returns:
        input_ids [2b, t]: rows 0..b-1 prompt + chosen, rows b..2b-1 prompt + rejected, right-padded.
        loss_mask [2b, t]: 1 on response tokens only (prompt and pads 0).
    """
    seqs, masks = [], []
    for field in ("chosen", "rejected"):
        for ex in examples:
            seqs.append(ex["prompt"] + ex[field])
            masks.append([0] * len(ex["prompt"]) + [1] * len(ex[field]))
    return pad_right(seqs, pad_id), pad_right(masks, 0)
