"""Tokenise once: flat arrays equal to the list examples, cached by fingerprint, rebuilt when an input changes."""
import json
import os

import numpy as np
import pytest

from nanoalign import tokenized
from nanoalign.data import read_records, sft_examples
from nanoalign.tokenized import TokenizedSet, sft_dataset
from tests.fixtures import cached_toy_setup, write_jsonl


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def chat(toy):
    from nanoalign.chat import load_chat
    return load_chat(toy.model)


def test_flat_arrays_equal_the_list_examples(toy, chat, tmp_path):
    examples, stats = sft_examples(read_records(toy.sft), chat, 60)  # some longer than 60 dropped
    ds = sft_dataset(toy.sft, "train", None, chat, 60, "drop", cache_dir=None)
    assert len(ds) == len(examples) == stats["kept"] and 0 < stats["dropped_too_long"]
    assert {k: ds.stats[k] for k in stats} == stats
    for i, ex in enumerate(examples):
        assert ds[i]["ids"].tolist() == ex["ids"] and ds[i]["mask"].tolist() == ex["mask"]
    assert ds.ids.dtype == np.int32 and ds.mask.dtype == np.uint8 and ds.offsets[-1] == ds.stats["tokens"]
    assert ds.ids.nbytes + ds.mask.nbytes == 5 * ds.stats["tokens"]  # 5 bytes a token, not ~49 for int lists
    sub = ds.subset([3, 0])
    assert len(sub) == 2 and sub[0]["ids"].tolist() == examples[3]["ids"] and sub.lengths == [
        len(examples[3]["ids"]), len(examples[0]["ids"])]
    # saved and memory-mapped back, the same
    ds.save(tmp_path / "c")
    back = TokenizedSet.load(tmp_path / "c")
    assert isinstance(back.ids, np.memmap) and back.stats == ds.stats
    assert all(back[i]["ids"].tolist() == ex["ids"] for i, ex in enumerate(examples))


def test_cache_is_reused_and_rebuilt_when_an_input_changes(toy, chat, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [json.loads(line)
                                                for line in toy.sft.read_text().splitlines()[:10]])
    cache = tmp_path / "cache"
    builds = []
    build = tokenized.build_sft
    monkeypatch.setattr(tokenized, "build_sft", lambda *a, **k: builds.append(1) or build(*a, **k))

    first = sft_dataset(data, "train", None, chat, 2048, "drop", cache)
    again = sft_dataset(data, "train", None, chat, 2048, "drop", cache)  # a rerun, or rank 1: loads
    assert len(builds) == 1 and again[4]["ids"].tolist() == first[4]["ids"].tolist()
    assert [p.name.startswith("sft-") for p in cache.iterdir()] == [True]  # no temporary dir left

    sft_dataset(data, "train", None, chat, 1024, "drop", cache)  # another setting
    assert len(builds) == 2
    chat.default_system, system = "Be brief.", chat.default_system  # another rendering
    try:
        sft_dataset(data, "train", None, chat, 2048, "drop", cache)
    finally:
        chat.default_system = system
    assert len(builds) == 3
    with open(data, "a") as f:  # the data file changed
        f.write(toy.sft.read_text().splitlines()[20] + "\n")
    assert len(sft_dataset(data, "train", None, chat, 2048, "drop", cache)) == 11 and len(builds) == 4


def test_failed_build_leaves_no_cache(toy, chat, tmp_path):
    lines = toy.sft.read_text().splitlines()[:5]
    lines[3] = lines[3][:-5]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:4"):
        sft_dataset(data, "train", None, chat, 2048, "drop", tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
