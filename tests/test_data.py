"""nanoalign.data: reading (JSONL, JSON, parquet, directories, hub file selection), rendering, mixing, batching."""
import json
import sys
from collections import Counter

import huggingface_hub
import pytest
import torch

from nanoalign.chat import load_chat
from nanoalign.data import (batch_indices, holdout_and_mix, mix, pad_right, preference_batch, preference_examples,
                            read_records, select_files, sft_examples, sft_batches, shard, split_holdout)
from nanoalign.errors import InputError
from nanoalign.toy import build_tokenizer


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return load_chat(build_tokenizer(tmp_path_factory.mktemp("tok")))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# rows in the real datasets' schemas
SMOLTALK = [  # HuggingFaceTB/smol-smoltalk
    {"messages": [user("What is the largest number among 3, 9, 4?"), assistant("9")], "source": "smol-magpie-ultra"},
    {"messages": [{"role": "system", "content": "Answer briefly."}, user("Hello!"), assistant("Hello! How can I help?"),
                  user("Find the maximum of 1, 2."), assistant("2")], "source": "everyday-conversations"},
]


def ultrafeedback_row(prompt, good, bad, prompt_id="p0"):  # HuggingFaceH4/ultrafeedback_binarized
    return {"prompt": prompt, "prompt_id": prompt_id,
            "chosen": [user(prompt), assistant(good)], "rejected": [user(prompt), assistant(bad)],
            "messages": [user(prompt), assistant(good)], "score_chosen": 8.0, "score_rejected": 5.5}


def write_jsonl(path, rows, blank_line_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# -----------------------------------------------------------------------------
# reading


def test_read_jsonl_and_json_list(tmp_path):
    f = write_jsonl(tmp_path / "sft.jsonl", SMOLTALK, blank_line_after=1)  # blank line 2 is skipped, not counted
    assert list(read_records(f)) == [(f"{f}:1", SMOLTALK[0]), (f"{f}:3", SMOLTALK[1])]
    g = tmp_path / "sft.json"
    g.write_text(json.dumps(SMOLTALK, indent=2))
    assert list(read_records(g)) == [(f"{g}:0", SMOLTALK[0]), (f"{g}:1", SMOLTALK[1])]


def test_read_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(SMOLTALK[0]) + "\n" + json.dumps(SMOLTALK[1]) + "\n" + '{"messages": [}\n')
    with pytest.raises(ValueError, match=f"^{f}:3: malformed JSON"):
        list(read_records(f))
    g = tmp_path / "bad.json"
    g.write_text('[\n  {"messages": []},\n  {"messages": ]\n]')
    with pytest.raises(ValueError, match=f"^{g}:3: malformed JSON"):
        list(read_records(g))
    h = write_jsonl(tmp_path / "list.jsonl", [SMOLTALK[0], [1, 2]])
    with pytest.raises(ValueError, match=f"^{h}:2: expected a JSON object per row, got list"):
        list(read_records(h))
    with pytest.raises(FileNotFoundError, match="^no such file or directory: missing/sft.jsonl$"):
        read_records("missing/sft.jsonl")  # at the call, not at the first row
    (tmp_path / "sft.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=f"^{tmp_path}/sft.csv: unsupported file type"):
        read_records(tmp_path / "sft.csv")


def test_read_directory_by_split(tmp_path):
    write_jsonl(tmp_path / "train-00000-of-00002.jsonl", SMOLTALK[:1])
    write_jsonl(tmp_path / "train-00001-of-00002.jsonl", SMOLTALK[1:])
    write_jsonl(tmp_path / "test.jsonl", SMOLTALK[:1] * 3)
    (tmp_path / "README.md").write_text("# not data\n")
    got = list(read_records(tmp_path))
    assert got == [(f"{tmp_path}/train-00000-of-00002.jsonl:1", SMOLTALK[0]),
                   (f"{tmp_path}/train-00001-of-00002.jsonl:1", SMOLTALK[1])]
    assert len(list(read_records(tmp_path, split="test"))) == 3
    with pytest.raises(ValueError, match=f"^{tmp_path}: no files for split 'validation'; splits: test, train$"):
        read_records(tmp_path, split="validation")


def test_parquet_rows(tmp_path, chat):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [ultrafeedback_row("Which is biggest: 3, 8, 5?", "8", "5", "a"),
            ultrafeedback_row("Find the maximum of 7, 2.", "7", "2", "b")]
    f = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    got = list(read_records(f))
    assert [w for w, _ in got] == [f"{f}:row 0", f"{f}:row 1"]
    assert [r for _, r in got] == rows
    examples, stats = preference_examples(got, chat, max_len=64, max_prompt_len=48)
    assert stats["kept"] == 2 and examples[1]["chosen"] == chat.render_response("7")


def test_unreadable_parquet_is_one_line_naming_the_file(tmp_path):
    """Garbage, a file cut short and a corrupt page: InputError naming the file (pyarrow's ArrowInvalid / OSError
    came out as a traceback)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet\n" * 20)
    real = tmp_path / "real.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"question {i}" * 10} for i in range(5000)]), real,
                   row_group_size=1024)
    data = real.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[:len(data) // 2])
    corrupt = tmp_path / "corrupt.parquet"  # the second row group's page zeroed: rows 0-1023 read, then the error
    at = pq.ParquetFile(real).metadata.row_group(1).column(0).data_page_offset
    corrupt.write_bytes(data[:at] + bytes(200) + data[at + 200:])
    for path, where in ((garbage, ""), (cut, ""), (corrupt, " after row 1023")):
        with pytest.raises(InputError, match=rf"^{path}: not a readable parquet file{where} \(") as e:
            list(read_records(path))
        assert "\n" not in str(e.value)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "train.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install nanoalign\[parquet\]"):
        list(read_records(f))


UF_FILES = [".gitattributes", "README.md"] + [  # HuggingFaceH4/ultrafeedback_binarized
    f"data/{split}-00000-of-00001-{h}.parquet" for split, h in
    (("test_gen", "3d4cd8309148a71f"), ("test_prefs", "b622ee6a1d71e7c6"), ("test_sft", "f7dfac4afe5b93f4"),
     ("train_gen", "4d0d8df8b0b7a6c0"), ("train_prefs", "17309c769bfe5733"), ("train_sft", "b9f6e1bfa3e7e33b"))]
SMOLTALK_FILES = ["README.md"] + [  # HuggingFaceTB/smoltalk: one folder per config
    f"data/{config}/{split}-0000{i}-of-0000{n}.parquet"
    for config, n_train in (("all", 4), ("smol-magpie-ultra", 2))
    for split, n in (("train", n_train), ("test", 1)) for i in range(n)]


def test_select_files_hub_layouts():
    assert select_files(UF_FILES, "train_prefs") == ["data/train_prefs-00000-of-00001-17309c769bfe5733.parquet"]
    assert select_files(UF_FILES, "test_sft") == ["data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet"]
    assert select_files(SMOLTALK_FILES, "train", "all") == [f"data/all/train-0000{i}-of-00004.parquet"
                                                            for i in range(4)]
    assert select_files(SMOLTALK_FILES, "test", "smol-magpie-ultra") == [
        "data/smol-magpie-ultra/test-00000-of-00001.parquet"]
    # a config folder at the top level
    top = ["all/train-00000-of-00002.parquet", "all/train-00001-of-00002.parquet", "all/test-00000-of-00001.parquet"]
    assert select_files(top, "train", "all") == top[:2]
    assert select_files(top, "test") == top[2:]  # the only config needs no name
    # the refs/convert/parquet layout <config>/<split>/NNNN.parquet
    converted = ["default/train/0000.parquet", "default/train/0001.parquet", "default/test/0000.parquet"]
    assert select_files(converted, "train") == converted[:2]
    # files outside config folders win when config is None; parquet wins over JSON lines
    assert select_files(["data/train.jsonl", "data/train.parquet", "data/test.jsonl", "extra/train.jsonl"],
                        "train") == ["data/train.parquet"]


def test_select_files_errors():
    with pytest.raises(ValueError, match="no files for split 'train'; splits: test_gen, test_prefs, test_sft, "
                                         "train_gen, train_prefs, train_sft"):
        select_files(UF_FILES, "train", source="HuggingFaceH4/ultrafeedback_binarized")
    with pytest.raises(ValueError, match="pick a config, one of: all, smol-magpie-ultra"):
        select_files(SMOLTALK_FILES, "train")
    with pytest.raises(ValueError, match="no config 'everyday'; configs: all, smol-magpie-ultra"):
        select_files(SMOLTALK_FILES, "train", "everyday")
    with pytest.raises(ValueError, match=r"\(config all\): no files for split 'validation'; splits: test, train"):
        select_files(SMOLTALK_FILES, "validation", "all")
    with pytest.raises(ValueError, match="no data files"):
        select_files(["README.md", ".gitattributes"], "train")


def test_read_hub_dataset_offline(tmp_path, monkeypatch):
    """The hub path end to end, with list_repo_files / hf_hub_download replaced by local files."""
    repo = "HuggingFaceTB/smol-smoltalk"
    files = {"data/train-00000-of-00002.jsonl": SMOLTALK[:1], "data/train-00001-of-00002.jsonl": SMOLTALK[1:],
             "data/test-00000-of-00001.jsonl": SMOLTALK}
    for name, rows in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / name, rows)
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda r, repo_type: ["README.md", *files])

    def download(r, name, repo_type):
        calls.append((r, name, repo_type))
        return str(tmp_path / name)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    got = list(read_records(repo))
    assert got == [(f"{repo}/data/train-00000-of-00002.jsonl:1", SMOLTALK[0]),
                   (f"{repo}/data/train-00001-of-00002.jsonl:1", SMOLTALK[1])]
    assert calls == [(repo, "data/train-00000-of-00002.jsonl", "dataset"),
                     (repo, "data/train-00001-of-00002.jsonl", "dataset")]

    def offline(r, repo_type):
        raise ConnectionError("Max retries exceeded\nmore details")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(FileNotFoundError, match=r"list hub dataset 'a/b': ConnectionError: Max retries exceeded$"):
        read_records("a/b")


# -----------------------------------------------------------------------------
# SFT examples


def test_sft_examples_exact_and_truncation(tmp_path, chat):
    f = write_jsonl(tmp_path / "sft.jsonl", SMOLTALK)
    examples, stats = sft_examples(read_records(f), chat, max_len=1000)
    assert stats == dict(kept=2, dropped_too_long=0, cut=0, dropped_no_assistant_tokens=0)
    for ex, row in zip(examples, SMOLTALK):
        assert (ex["ids"], ex["mask"]) == chat.render(row["messages"])
    # the multi-turn row trains both replies: "Hello! How can I help?" + <|im_end|> and "2" + <|im_end|>
    n_trained = len(chat.encode("Hello! How can I help?")) + 1 + len(chat.encode("2")) + 1
    assert sum(examples[1]["mask"]) == n_trained

    n0, n1 = len(examples[0]["ids"]), len(examples[1]["ids"])
    assert n0 < n1
    # "drop": only the long one goes; "cut": it keeps its first n0 tokens
    kept, stats = sft_examples(read_records(f), chat, max_len=n0, truncation="drop")
    assert stats == dict(kept=1, dropped_too_long=1, cut=0, dropped_no_assistant_tokens=0)
    assert kept == examples[:1]
    cut, stats = sft_examples(read_records(f), chat, max_len=n0, truncation="cut")
    assert stats == dict(kept=2, dropped_too_long=0, cut=1, dropped_no_assistant_tokens=0)
    assert cut[1] == {"ids": examples[1]["ids"][:n0], "mask": examples[1]["mask"][:n0]}


def test_sft_examples_drops_rows_without_assistant_tokens(tmp_path, chat):
    rows = [SMOLTALK[1], {"messages": [user("Hello!")]}]
    f = write_jsonl(tmp_path / "sft.jsonl", rows)
    n_first_reply = chat.render(SMOLTALK[1]["messages"])[1].index(1)
    examples, stats = sft_examples(read_records(f), chat, max_len=n_first_reply + 1, truncation="cut")
    assert stats == dict(kept=1, dropped_too_long=0, cut=1, dropped_no_assistant_tokens=1)
    assert examples[0]["mask"] == [0] * n_first_reply + [1]
    with pytest.raises(ValueError, match=rf"^no usable examples in {f} "):
        sft_examples(read_records(f), chat, max_len=n_first_reply, truncation="cut")


def test_sft_examples_errors_name_row_and_field(tmp_path, chat):
    f = write_jsonl(tmp_path / "sft.jsonl", [SMOLTALK[0], {"conversations": SMOLTALK[0]["messages"]}])
    with pytest.raises(ValueError, match=rf"^{f}:2: field 'messages' must be a non-empty list .*\(missing\)"):
        sft_examples(read_records(f), chat, max_len=100)
    g = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "human", "content": "hi"}, assistant("hey")]}])
    with pytest.raises(ValueError, match=rf"^{g}:1: message 0: field 'role'"):
        sft_examples(read_records(g), chat, max_len=100)
    h = write_jsonl(tmp_path / "content.jsonl", [{"messages": [user("hi"), {"role": "assistant"}]}])
    with pytest.raises(ValueError, match=rf"^{h}:1: field 'messages'"):
        sft_examples(read_records(h), chat, max_len=100)


# -----------------------------------------------------------------------------
# preference examples


def test_preference_examples_forms(tmp_path, chat):
    q = "What is the largest number among 3, 9, 4?"
    rows = [ultrafeedback_row(q, "9", "4"),
            {"prompt": q, "chosen": "9", "rejected": "The answer is 3.", "score_chosen": 1.0,  # our synthetic rows
             "score_rejected": 0.1, "policy": "sft"},
            {"prompt": [user(q)], "chosen": "9", "rejected": "3"}]
    f = write_jsonl(tmp_path / "prefs.jsonl", rows)
    examples, stats = preference_examples(read_records(f), chat, max_len=200, max_prompt_len=100)
    assert stats == dict(kept=3, dropped_identical=0, prompt_cut=0, response_cut=0)
    prompt = chat.render_prompt([user(q)])
    assert examples[0] == {"prompt": prompt, "chosen": chat.render_response("9"), "rejected": chat.render_response("4")}
    assert examples[1] == {"prompt": prompt, "chosen": chat.render_response("9"),
                           "rejected": chat.render_response("The answer is 3.")}
    assert examples[2]["prompt"] == prompt
    # prompt + chosen is the SFT rendering of the whole conversation without its trailing "\n", and ends in <|im_end|>
    ids, mask = chat.render(rows[0]["chosen"])
    assert prompt + examples[0]["chosen"] == ids[:-len(chat.encode("\n"))]
    assert examples[0]["chosen"][-1] == chat.im_end_id


def test_unfinished_answers_get_no_end_token(tmp_path, chat):
    """gen_synthetic.py marks an answer cut at --max-new-tokens `*_finished: false`: it is trained as it was sampled,
    without <|im_end|>, so DPO never teaches the model to stop where it was only cut off."""
    q = "What is the largest number among 3, 9, 4?"
    rows = [{"prompt": q, "chosen": "9", "rejected": "The answer is 3 and", "chosen_finished": True,
             "rejected_finished": False},
            {"prompt": q, "chosen": "It is 9, because", "rejected": "4", "chosen_finished": False}]
    f = write_jsonl(tmp_path / "prefs.jsonl", rows)
    examples, _ = preference_examples(read_records(f), chat, max_len=200, max_prompt_len=100)
    assert examples[0]["chosen"] == chat.encode("9") + [chat.im_end_id]
    assert examples[0]["rejected"] == chat.encode("The answer is 3 and")  # no <|im_end|>
    assert examples[1]["chosen"] == chat.encode("It is 9, because")
    assert examples[1]["rejected"] == chat.encode("4") + [chat.im_end_id]  # absent: finished
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"prompt": q, "chosen": "9", "rejected": "4",
                                                       "rejected_finished": "no"}])
    with pytest.raises(InputError, match=r"bad.jsonl:3: field 'rejected_finished' must be true or false, got 'no'"):
        preference_examples(read_records(bad), chat, max_len=200, max_prompt_len=100)


def test_preference_examples_multi_turn_prompt(tmp_path, chat):
    convo = [{"role": "system", "content": "Answer briefly."}, user("Hello!"), assistant("Hi."), user("Max of 1, 2?")]
    row = {"prompt": "Max of 1, 2?", "chosen": convo + [assistant("2")], "rejected": convo + [assistant("1")]}
    examples, _ = preference_examples([("x.jsonl:1", row)], chat, max_len=200, max_prompt_len=150)
    assert examples[0]["prompt"] == chat.render_prompt(convo)
    bad = dict(row, rejected=[user("Other question?"), assistant("1")])
    with pytest.raises(ValueError, match="^x.jsonl:7: 'chosen' and 'rejected' continue different conversations"):
        preference_examples([("x.jsonl:7", bad)], chat, max_len=200, max_prompt_len=150)
    with pytest.raises(ValueError, match="^x.jsonl:8: field 'chosen': last message must be the assistant response"):
        preference_examples([("x.jsonl:8", dict(row, chosen=convo))], chat, max_len=200, max_prompt_len=150)
    with pytest.raises(ValueError, match="^x.jsonl:9: missing field 'rejected'"):
        preference_examples([("x.jsonl:9", {"prompt": "q", "chosen": "a"})], chat, max_len=200, max_prompt_len=150)


def test_preference_truncation_keeps_prompt_end_and_response_start(chat):
    q = "Sort 12, 7, 33, 5, 81 from smallest to largest. Which number comes last?"
    good, bad = "The largest number is 81, so 81 comes last.", "5"
    full_p, full_c, full_r = chat.render_prompt([user(q)]), chat.render_response(good), chat.render_response(bad)
    max_prompt_len, max_len = 20, 26
    assert len(full_p) > max_prompt_len and len(full_c) > max_len - max_prompt_len > len(full_r)
    examples, stats = preference_examples([("p.jsonl:1", {"prompt": q, "chosen": good, "rejected": bad})], chat,
                                          max_len=max_len, max_prompt_len=max_prompt_len)
    assert stats == dict(kept=1, dropped_identical=0, prompt_cut=1, response_cut=1)
    ex = examples[0]
    assert ex["prompt"] == full_p[-20:]  # ends with the question's end and "<|im_start|>assistant\n"
    assert ex["chosen"] == full_c[:6]  # 26 - 20: start of the response kept, <|im_end|> lost
    assert ex["rejected"] == full_r  # short enough: untouched
    assert len(ex["prompt"] + ex["chosen"]) == max_len


def test_preference_identical_pairs_skipped(chat):
    rows = [("p.jsonl:1", {"prompt": "q", "chosen": "same", "rejected": "same"}),
            ("p.jsonl:2", {"prompt": "q", "chosen": "answer one", "rejected": "answer two"}),
            ("p.jsonl:3", {"prompt": "q", "chosen": "a", "rejected": "b"})]
    one, two = chat.encode("answer one"), chat.encode("answer two")
    common = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
    assert common >= 1
    # room for exactly the common start: pair 2 becomes identical after truncation and is dropped too
    max_prompt_len = len(chat.render_prompt([user("q")]))
    examples, stats = preference_examples(rows, chat, max_len=max_prompt_len + common, max_prompt_len=max_prompt_len)
    assert stats == dict(kept=1, dropped_identical=2, prompt_cut=0, response_cut=0)
    assert examples[0]["chosen"] == chat.render_response("a")
    with pytest.raises(ValueError, match="^no usable examples in p.jsonl "):
        preference_examples(rows[:1], chat, max_len=50, max_prompt_len=40)


# -----------------------------------------------------------------------------
# mixing, holdout, sharding


def test_mix_counts_and_determinism():
    human, synthetic = [f"h{i}" for i in range(10)], [f"s{i}" for i in range(4)]
    both = mix([human, synthetic], [1.0, 1.0], seed=0)
    assert sorted(both) == sorted(human + synthetic) and both != human + synthetic  # everything once, shuffled
    out = mix([human, synthetic], [0.5, 2.0], seed=0)
    hs = [x for x in out if x.startswith("h")]
    assert len(out) == 13 and len(hs) == 5 and len(set(hs)) == 5  # a random half of human, no repeats
    assert sorted(x for x in out if x.startswith("s")) == sorted(synthetic * 2)
    counts = Counter(mix([synthetic], [1.5], seed=3))  # round(1.5 * 4) = 6: all once + 2 distinct extra
    assert sorted(counts) == synthetic and sorted(counts.values()) == [1, 1, 2, 2]
    assert sorted(mix([human, synthetic], [0.0, 1.0], seed=0)) == synthetic
    assert mix([human, synthetic], [0.5, 2.0], seed=0) == out
    assert mix([human, synthetic], [0.5, 2.0], seed=1) != out


def test_split_holdout():
    data = list(range(100))
    train, evals = split_holdout(data, 0.1, seed=0)
    assert len(evals) == 10 and len(train) == 90
    assert sorted(train + evals) == data and evals == sorted(evals)  # disjoint, covering, input order kept
    assert split_holdout(data, 0.1, seed=0) == (train, evals)
    assert split_holdout(data, 0.1, seed=1)[1] != evals
    assert split_holdout(list(range(5)), 0.01, seed=0)[1].__len__() == 1  # frac > 0 holds out at least one
    assert split_holdout(data, 0.0, seed=0) == (data, [])


def test_holdout_before_mixing_keeps_eval_out_of_train():
    """An upsampled source (weight 2) and a fractional one (1.5): no held-out pair, by content, is trained on. Mixing
    first and holding out after (the old order) left the twin of every held-out pair of the 2x source in train."""
    human = [{"prompt": [1, i], "chosen": [2], "rejected": [3]} for i in range(50)]
    synthetic = [{"prompt": [4, i], "chosen": [5], "rejected": [6]} for i in range(20)]
    synthetic.append(dict(synthetic[0]))  # a duplicate row within a source
    train, evals = holdout_and_mix([human, synthetic], [2.0, 1.5], 0.2, seed=0)
    content = lambda ex: json.dumps(ex, sort_keys=True)  # noqa: E731
    held = {content(ex) for ex in evals}
    assert len(evals) == 10 + 4 and len(held) == len(evals)  # round(0.2 * 50) + round(0.2 * 21), each once
    assert not held & {content(ex) for ex in train}
    human_train = [ex for ex in train if ex["prompt"][0] == 1]
    assert len(human_train) == 2 * 40 and Counter(map(content, human_train)).most_common(1)[0][1] == 2
    assert holdout_and_mix([human, synthetic], [2.0, 1.5], 0.2, seed=0) == (train, evals)  # deterministic
    # weight 0: neither trained nor evaluated; frac 0: no eval, mix as before
    train0, evals0 = holdout_and_mix([human, synthetic], [1.0, 0.0], 0.2, seed=0)
    assert len(evals0) == 10 and all(ex["prompt"][0] == 1 for ex in train0 + evals0)
    assert holdout_and_mix([human, synthetic], [2.0, 1.5], 0.0, seed=0) == (mix([human, synthetic], [2.0, 1.5], 0), [])
    # split_holdout alone also keeps a held-out example's copies out of train
    dup = [{"ids": [i % 5], "mask": [1]} for i in range(20)]  # every content 4 times
    train, evals = split_holdout(dup, 0.1, seed=0)
    assert not {content(ex) for ex in evals} & {content(ex) for ex in train}


def test_sft_holdout_keeps_every_copy_of_a_conversation_on_one_side(tmp_path, chat):
    """train_sft.py's split of a tokenised set (numpy views, keyed by a digest of their bytes): with every
    conversation twice, no held-out conversation is also trained on (by row index, as before: 10 of 10 were)."""
    from nanoalign.data import content_key
    from nanoalign.tokenized import build_sft
    rows = [{"messages": [user(f"What is the largest number among {i}, {i + 1}?"), assistant(str(i + 1))]}
            for i in range(50)]
    dataset = build_sft(read_records(write_jsonl(tmp_path / "sft.jsonl", rows + rows)), chat, 128, "drop",
                        progress=False)
    train, evals = split_holdout(list(range(100)), 0.1, seed=0, key=lambda i: content_key(dataset[i]))
    ids = lambda i: dataset[i]["ids"].tobytes()  # noqa: E731
    assert len(evals) == 10 and not {ids(i) for i in evals} & {ids(i) for i in train}
    held = {i % 50 for i in evals}  # conversation i is rows i and 50 + i
    assert sorted(train) == [i for i in range(100) if i % 50 not in held]  # both copies, or neither, in train


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (7, 1), (5, 5), (1, 2), (61, 3)])
def test_shard_covers_every_example(n, world):
    """Eval shares: disjoint, together every example (no remainder dropped), sizes differ by at most one."""
    data = list(range(n))
    shards = [shard(data, r, world) for r in range(world)]
    assert sorted(x for s in shards for x in s) == data
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard(list(range(10)), 1, 3) == [1, 4, 7]


# -----------------------------------------------------------------------------
# batching


def test_pad_right():
    out = pad_right([[5, 6, 7], [8], [9, 10]], pad_value=0)
    assert out.dtype == torch.long
    assert torch.equal(out, torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]))


def test_sft_batches_cover_shuffle_and_pad(chat):
    pad = chat.pad_id
    # example i starts with token 100 + i; example 0 ends in a trained pad id (pad == eos on Qwen base models):
    # the batch mask must keep it, and must be 0 on the padding after shorter rows
    examples = [{"ids": [100, 7, pad], "mask": [0, 1, 1]}] + \
               [{"ids": [100 + i] + [7] * (i % 5 + 1), "mask": [0] + [1] * (i % 5 + 1)} for i in range(1, 23)]
    batches = list(sft_batches(examples, batch_size=4, pad_id=pad, seed=0, epoch=0))
    assert sorted(ids.shape[0] for ids, _ in batches) == [3, 4, 4, 4, 4, 4]  # 23 = 5 * 4 + 3
    seen = []
    for ids, mask in batches:
        assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long
        for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):
            ex = examples[row_ids[0] - 100]
            n_pad = len(row_ids) - len(ex["ids"])
            assert row_ids == ex["ids"] + [pad] * n_pad and row_mask == ex["mask"] + [0] * n_pad
            seen.append(row_ids[0] - 100)
    assert sorted(seen) == list(range(23))  # each example exactly once per epoch
    assert seen != list(range(23))  # shuffled
    same = [ids[:, 0].tolist() for ids, _ in sft_batches(examples, 4, pad, seed=0, epoch=0)]
    other = [ids[:, 0].tolist() for ids, _ in sft_batches(examples, 4, pad, seed=0, epoch=1)]
    assert same == [ids[:, 0].tolist() for ids, _ in batches] and other != same


def test_batch_indices_bucketing_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    bucketed = batch_indices(lengths, batch_size=8, seed=0, epoch=0, bucket=50)
    plain = batch_indices(lengths, batch_size=8, seed=0, epoch=0, bucket=1)  # chunk = one batch: no bucketing
    for batches in (bucketed, plain):
        assert sorted(i for b in batches for i in b) == list(range(400)) and all(len(b) == 8 for b in batches)
    assert padding(bucketed) < padding(plain) / 10


def test_preference_batch_layout():
    pad = 0
    examples = [{"prompt": [11, 12], "chosen": [21, 22, 23], "rejected": [31]},
                {"prompt": [13], "chosen": [24], "rejected": [32, 33, 34, 35]}]
    input_ids, loss_mask = preference_batch(examples, pad_id=pad)
    assert torch.equal(input_ids, torch.tensor([[11, 12, 21, 22, 23],   # prompt 0 + chosen 0
                                                [13, 24, 0, 0, 0],      # prompt 1 + chosen 1
                                                [11, 12, 31, 0, 0],     # prompt 0 + rejected 0
                                                [13, 32, 33, 34, 35]]))  # prompt 1 + rejected 1
    assert torch.equal(loss_mask, torch.tensor([[0, 0, 1, 1, 1],
                                                [0, 1, 0, 0, 0],
                                                [0, 0, 1, 0, 0],
                                                [0, 1, 1, 1, 1]]))


def test_prompt_records_forms_and_duplicates():
    from nanoalign.data import prompt_records
    rows = [("f:1", {"prompt": "hi"}),
            ("f:2", {"prompt": [{"role": "user", "content": "hi"}]}),  # same conversation as line 1: used once
            ("f:3", {"prompt_id": "p7", "messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"},
                                                     {"role": "user", "content": "c"},
                                                     {"role": "assistant", "content": "d"}]})]
    prompts = prompt_records(rows)
    assert [p[1] for p in prompts] == [[{"role": "user", "content": "hi"}],
                                       [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}]]
    assert prompts[1][0] == "p7" and len(prompts[0][0]) == 16
    with pytest.raises(ValueError, match="f:9: field 'messages' has no user turn"):
        prompt_records([("f:9", {"messages": [{"role": "system", "content": "s"}]})])
