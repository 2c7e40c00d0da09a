"""Hub datasets on a compute node with HF_HUB_OFFLINE=1 over a warm hub cache (PITFALLS #13): the test builds the
cache layout huggingface_hub writes (datasets--owner--name/{blobs/<sha256>, snapshots/<commit>/data/<split>-00000-
of-00001.parquet -> ../../blobs/<sha256>, refs/main}), and the scripts read hub ids from it with no network call,
every split, the tokenise-once cache keyed on the cached snapshot's commit as it is online."""
import hashlib
import io
import json
import os
import random
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import read_records
from nanoalign.errors import InputError
from nanoalign.tokenized import fingerprint
from tests.fixtures import cached_toy_setup, run_script

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

CHAT_REPO, PROMPT_REPO = "owner/smol-chat", "owner/feedback"
COMMIT, PROMPT_COMMIT = "3a1b2c3d4e5f60718293a4b5c6d7e8f901234567", "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
FP32 = ("--device", "cpu", "--precision", "fp32")


def hub_cache(root, repo, files, commit):
    """Write `files` ({path in repo: bytes}) into the hub cache at `root` as huggingface_hub lays out a dataset."""
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)


def parquet(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A chat dataset whose every conversation is there twice (train) plus a test split, and a prompt dataset in
    UltraFeedback's layout (train_gen / test_gen), in one hub cache."""
    setup = cached_toy_setup(tmp_path_factory)
    rows = [json.loads(line) for line in setup.sft.read_text().splitlines()]
    conversations = list({json.dumps(r, sort_keys=True): r for r in rows}.values())[:16]
    root = tmp_path_factory.mktemp("hub-cache")
    hub_cache(root, CHAT_REPO, {"README.md": b"# chat\n", ".gitattributes": b"*.parquet filter=lfs\n",
                                "data/train-00000-of-00001.parquet": parquet(conversations * 2),
                                "data/test-00000-of-00001.parquet": parquet(conversations[:2])}, COMMIT)
    rng = random.Random(0)
    prompts = [{"prompt": toy.make_prompt(rng, high=9)[0][0]["content"], "prompt_id": f"p{i}"} for i in range(6)]
    hub_cache(root, PROMPT_REPO, {f"data/{split}-00000-of-00001.parquet": parquet(part) for split, part in
                                  (("train_gen", prompts[:4]), ("test_gen", prompts[4:]))}, PROMPT_COMMIT)
    return SimpleNamespace(root=root, setup=setup, conversations=conversations, prompts=prompts)


@pytest.fixture
def offline_env(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 and the hub cache, for the scripts the test runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.root))


def test_hub_ids_resolve_from_the_cache_with_no_network_call(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.root))

    def network(*args, **kwargs):
        raise AssertionError("a network call while offline")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", network)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", network)
    train = list(read_records(CHAT_REPO))
    assert [r for _, r in train] == hub.conversations * 2
    assert train[0][0] == f"{CHAT_REPO}/data/train-00000-of-00001.parquet:row 0"
    assert [r for _, r in read_records(CHAT_REPO, "test")] == hub.conversations[:2]
    assert [r for _, r in read_records(PROMPT_REPO, "test_gen")] == hub.prompts[4:]
    with pytest.raises(InputError, match=rf"^{CHAT_REPO} \(hub cache, commit {COMMIT[:12]}\): no files for split "
                                         r"'validation'; splits: test, train$"):
        read_records(CHAT_REPO, "validation")
    with pytest.raises(FileNotFoundError, match=r"^no local path 'owner/elsewhere', and hub dataset 'owner/elsewhere' "
                                                r"is not in the hub cache \(.*\), which is all HF_HUB_OFFLINE=1 allows"):
        read_records("owner/elsewhere")

    # the tokenise-once fingerprint offline is the one online at the same commit: a cache built online is reused
    chat = load_chat(hub.setup.tokenizer)
    offline = fingerprint(CHAT_REPO, "train", None, chat, [2048, "drop"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = [p.relative_to(hub.root / "datasets--owner--smol-chat/snapshots" / COMMIT).as_posix()
               for p in (hub.root / "datasets--owner--smol-chat/snapshots" / COMMIT).rglob("*") if p.is_file()]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: listing)
    commit = COMMIT
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo: SimpleNamespace(sha=commit))
    assert fingerprint(CHAT_REPO, "train", None, chat, [2048, "drop"]) == offline
    commit = PROMPT_COMMIT  # the hub moved on: another fingerprint
    assert fingerprint(CHAT_REPO, "train", None, chat, [2048, "drop"]) != offline


def test_train_sft_on_a_cached_hub_dataset_offline_holds_out_copies_together(hub, offline_env, tmp_path):
    """train_sft.py --data owner/name with HF_HUB_OFFLINE=1 (it stopped with `could not list hub dataset ...:
    OfflineModeIsEnabled`). Every conversation is there twice: the 8 held out (seed 0) take their copies out of
    train, and the model card counts the held-out rows."""
    out = tmp_path / "sft"
    proc = run_script("train_sft.py", "--model", hub.setup.model, "--data", CHAT_REPO, "--out", out, "--no-pack",
                      "--eval-frac", 0.25, "--batch-size", 4, "--max-steps", 1, "--save-every", 0,
                      "--data-cache", tmp_path / "cache", *FP32)
    held = random.Random(0).sample(range(32), 8)  # split_holdout's draw; row i holds conversation i % 16
    n_train = 32 - 2 * len({i % 16 for i in held})
    assert f"{n_train} train / 8 eval conversations" in proc.stdout, proc.stdout
    card = (out / "final" / "README.md").read_text()
    assert f"| `{CHAT_REPO}` | {n_train} |" in card and "| `(held out for eval loss)` | 8 |" in card
    assert "eval_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 1


def test_gen_synthetic_reads_hub_prompts_offline(hub, offline_env, tmp_path):
    out = tmp_path / "synth"
    proc = run_script("gen_synthetic.py", "--model", hub.setup.model, "--prompts", PROMPT_REPO, "--num-samples", 2,
                      "--max-new-tokens", 2, "--reward", "toy", "--out", out, *FP32)
    assert "4 prompts: 0 done before, 4 to sample" in proc.stdout
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in samples] == [(f"p{i}", k) for i in range(4) for k in range(2)]
    assert json.loads((out / "summary.json").read_text())["prompts"] == 4
