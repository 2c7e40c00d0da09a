"""The scale tier: what a first real run meets and the toy runs elsewhere do not, on CPU with gloo ranks.

- a token-cache build longer than the process-group timeout (a short $NANOALIGN_DIST_TIMEOUT standing in for NCCL's
  10 minutes; tests/slow_build.py makes the build sleep past it), and a builder that fails or dies;
- FSDP and DDP evaluation with uneven shares, FSDP on an odd number of ranks (3);
- resuming on another number of ranks (SFT and DPO), an FSDP checkpoint that cannot be, and a rank that refuses;
- damaged caches and train states made for real (files cut, emptied, replaced), and a full disk (a real tmpfs).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import torch

from nanoalign import tokenized
from nanoalign.errors import InputError
from nanoalign.rundir import MARKER, RunDirError
from nanoalign.tokenized import BuildLock, build_sft, fingerprint, sft_dataset
from nanoalign.train import (check_finite_weights, dist_timeout, load_train_state, make_optimizer, make_scaler,
                             resolve_resume, save_train_state)
from tests.fixtures import cached_toy_setup, max_weight_diff, read_metrics, read_weights, run_script
from tests.test_rundir import tmpfs

pytestmark = pytest.mark.scale

FP32 = ("--device", "cpu", "--precision", "fp32")
TIMEOUT = "3"  # seconds: the process-group timeout of the multi-rank runs below; the slow build sleeps past it
SLOW_BUILD = "4"
# SFT on the 64 toy conversations, 7 held out: one process x batch 6, two DDP ranks x 3 (eval shares 4 + 3: 2 and 1
# batches), three FSDP ranks x 2 (eval shares 3 + 2 + 2: 2, 1 and 1 batches); the global batch is 6 in each
SFT = (*FP32, "--max-steps", 3, "--lr", 1e-3, "--eval-frac", 0.109, "--eval-every", 1, "--save-every", 2, "--no-pack")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def chat(toy):
    from nanoalign.chat import load_chat
    return load_chat(toy.model)


@pytest.fixture(scope="module")
def one(toy, tmp_path_factory):
    """The uninterrupted SFT run in one process (batch 6): ckpt-2, final/ and its metrics."""
    out = tmp_path_factory.mktemp("scale") / "one"
    proc = run_script("train_sft.py", "--model", toy.model, "--data", toy.sft, "--out", out, *SFT, "--batch-size", 6)
    assert re.search(r"\b57 train / 7 eval conversations", proc.stdout), proc.stdout  # the uneven shares above
    return out


def our_traceback(stderr):
    """A traceback through our code (torchrun prints its own when a rank fails: that one is not ours)."""
    return re.search(r'File "[^"]*(nanoalign/\w+|train_\w+|slow_build)\.py"', stderr)


def resumable_copy(run, out, ckpt):
    """What a run killed after `ckpt` leaves: the checkpoint and the recorded settings."""
    out.mkdir()
    shutil.copytree(run / ckpt, out / ckpt)
    shutil.copy(run / "run_settings.json", out)


# -----------------------------------------------------------------------------
# Tokenise once: the other ranks wait through the file system, however long the build

def test_ddp_resumes_on_two_ranks_after_a_build_longer_than_the_timeout(toy, one, tmp_path, monkeypatch):
    """One process ran 2 steps of batch 6; two ranks x batch 3 resume it (`--resume auto`, the same global batch)
    and end with the uninterrupted run's weights and its step-3 loss and eval loss (7 held-out conversations, 4 + 3
    over the ranks). First the token cache is built (in a new cache dir) for 4 s while rank 1 waits, with a 3 s
    process-group timeout: it used to die in dist.barrier() ("Timed out"), and the resume used to stop with
    `train_state_rank1.pt not found`."""
    monkeypatch.setenv("NANOALIGN_DIST_TIMEOUT", TIMEOUT)
    monkeypatch.setenv("SLOW_BUILD_S", SLOW_BUILD)
    out = tmp_path / "resumed"
    resumable_copy(one, out, "ckpt-2")
    t0 = time.time()
    proc = run_script("tests/slow_build.py", "--model", toy.model, "--data", toy.sft, "--out", out, *SFT,
                      "--batch-size", 3, "--resume", "auto", "--data-cache", tmp_path / "cache", nproc=2, timeout=120)
    assert time.time() - t0 > float(SLOW_BUILD) > float(TIMEOUT)
    assert proc.stdout.count(f"process group timeout: {float(TIMEOUT)} s (the script)") == 2  # from the env var
    assert proc.stdout.count(f"once into {tmp_path / 'cache'}") == 1 and f"resumed from {out / 'ckpt-2'} at step 2" in proc.stdout
    rows, full = read_metrics(out), read_metrics(one)
    assert [r["step"] for r in rows] == [3]
    for k in ("loss", "grad_norm", "eval_loss"):
        assert rows[0][k] == pytest.approx(full[2][k], rel=1e-5, abs=1e-6), k
    weights = read_weights(one / "final")
    assert max_weight_diff(weights, read_weights(out / "final")) < 1e-5 < max_weight_diff(weights, read_weights(toy.model))


def test_builder_error_reaches_the_user_as_its_one_line(toy, tmp_path, monkeypatch):
    """The builder (local rank 0) reads a bad row after 4 s of building; rank 1, waiting past the 3 s timeout, does
    not die of it first: the job ends with the builder's one line naming the file and line, no traceback of ours."""
    monkeypatch.setenv("NANOALIGN_DIST_TIMEOUT", TIMEOUT)
    monkeypatch.setenv("SLOW_BUILD_S", SLOW_BUILD)
    lines = toy.sft.read_text().splitlines()
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines[:40] + [lines[40][:-3]] + lines[41:]) + "\n")
    proc = run_script("tests/slow_build.py", "--model", toy.model, "--data", data, "--out", tmp_path / "out", *SFT,
                      "--batch-size", 3, "--data-cache", tmp_path / "cache", nproc=2, timeout=120, check=False)
    assert proc.returncode != 0 and not our_traceback(proc.stderr), proc.stderr[-3000:]
    assert f"error: {data}:41: malformed JSON" in proc.stderr and "Timed out" not in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half cache, no lock left


def test_waiting_ranks_follow_the_builder(toy, chat, tmp_path):
    """The wait itself (is_builder=False), with a thread holding the build lock as local rank 0 would: the waiter
    keeps waiting while the lock is held (here 4x its give-up time), loads the cache once it is there, and, when the
    builder lets go of the lock without a cache (it failed or died: the OS drops a dead process's flock), stops
    with one line instead of waiting for ever."""
    cache, poll = tmp_path / "cache", 0.02
    path = cache / f"sft-{fingerprint(toy.sft, 'train', None, chat, [2048, 'drop'])}"

    def builder(build):
        lock = BuildLock(path)
        assert lock.fd is not None
        time.sleep(40 * poll)
        if build:
            build_sft(tokenized.read_records(toy.sft), chat, 2048, "drop", progress=False).save(path)
        lock.release()

    for build in (False, True):
        thread = threading.Thread(target=builder, args=(build,))
        thread.start()
        time.sleep(5 * poll)
        t0 = time.time()
        try:
            if not build:
                with pytest.raises(InputError, match=f"^the token cache {path} was not finished: local rank 0, which "
                                                     f"was building it, stopped \\(see its error\\)$"):
                    sft_dataset(toy.sft, "train", None, chat, 2048, "drop", cache, is_builder=False, poll_s=poll)
            else:
                ds = sft_dataset(toy.sft, "train", None, chat, 2048, "drop", cache, is_builder=False, poll_s=poll)
                assert len(ds) == 64 and ds.stats["tokens"] == len(ds.ids)
        finally:
            thread.join()
        assert time.time() - t0 > 30 * poll  # waited for the lock holder, not only the give-up time
    assert sorted(p.name for p in cache.iterdir()) == [path.name]


def test_process_group_timeout_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("NANOALIGN_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == timedelta(minutes=30)
    monkeypatch.setenv("NANOALIGN_DIST_TIMEOUT", "7200")
    assert dist_timeout() == timedelta(hours=2)
    for bad in ("0", "-5", "nan", "inf", "10m", ""):
        monkeypatch.setenv("NANOALIGN_DIST_TIMEOUT", bad)
        with pytest.raises(InputError, match=rf"^NANOALIGN_DIST_TIMEOUT must be a number in \(0, 1e\+09\] \(seconds\), "
                                             rf"got {bad!r}$"):
            dist_timeout()


# -----------------------------------------------------------------------------
# FSDP: every forward is a collective, so every rank runs as many eval forwards; sharded state resumes on as many

def test_fsdp_on_three_ranks_with_uneven_eval_shares(toy, one, tmp_path, monkeypatch):
    """Three FSDP ranks x batch 2 train what one process x batch 6 trains, and evaluate 7 held-out conversations as
    3 + 2 + 2 (2, 1 and 1 batches: the short ranks run padding forwards): each step's eval loss is the single
    process's. It used to hang at the first eval. Its sharded optimizer state resumes only on 3 ranks: on 2, one
    line before any work."""
    out = tmp_path / "fsdp"
    run_script("train_sft.py", "--model", toy.model, "--data", toy.sft, "--out", out, *SFT, "--batch-size", 2,
               "--fsdp", nproc=3, timeout=120)
    rows, full = read_metrics(out), read_metrics(one)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r, r_one in zip(rows, full):
        for k in ("loss", "eval_loss"):
            assert r[k] == pytest.approx(r_one[k], abs=1e-5), (r["step"], k)
    assert max_weight_diff(read_weights(out / "final"), read_weights(one / "final")) < 1e-5

    ckpt = out / "ckpt-2"
    assert sorted(p.name for p in ckpt.glob("train_state*")) == [f"train_state_rank{r}.pt" for r in range(3)]
    assert json.loads((ckpt / MARKER).read_text())["world_size"] == 3
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_resume("auto", out, sharded=True) == out / "ckpt-3"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=f"^cannot resume {ckpt} on 2 ranks: --fsdp saved its optimizer state in 3 "
                                         f"shards, one a rank; resume it on 3 \\(torchrun --nproc_per_node=3\\)$"):
        resolve_resume(ckpt, out, sharded=True)
    with pytest.raises(InputError, match=f"^cannot resume {one / 'ckpt-2'} with --fsdp: it was saved without --fsdp"):
        resolve_resume(one / "ckpt-2", out, sharded=True)


# -----------------------------------------------------------------------------
# DPO resumes on another number of ranks too

def test_dpo_resumes_on_two_ranks(toy, tmp_path):
    """LoRA DPO: one process x 2 pairs for 2 steps, then two ranks x 1 pair resume it and end with the uninterrupted
    run's adapter, step-3 loss and eval metrics (3 held-out pairs: 2 + 1 over the ranks)."""
    args = ("--model", toy.model, "--data", toy.prefs, *FP32, "--max-steps", 3, "--lr", 1e-2, "--eval-frac", 0.094,
            "--save-every", 2)
    run_script("train_dpo.py", *args, "--out", tmp_path / "one", "--batch-size", 2)
    resumable_copy(tmp_path / "one", tmp_path / "resumed", "ckpt-2")
    proc = run_script("train_dpo.py", *args, "--out", tmp_path / "resumed", "--batch-size", 1, "--resume", "auto",
                      nproc=2)
    assert "29 train / 3 eval pairs" in proc.stdout
    rows, full = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [3]
    for k in ("loss", "reward_margin", "grad_norm", "eval_loss", "eval_reward_margin"):
        assert rows[0][k] == pytest.approx(full[2][k], rel=1e-5, abs=1e-6), k
    adapter = read_weights(tmp_path / "one" / "final")
    assert max(t.abs().max().item() for k, t in adapter.items() if ".lora_B." in k) > 1e-3  # it moved (B starts at 0)
    assert max_weight_diff(adapter, read_weights(tmp_path / "resumed" / "final")) < 1e-6


# -----------------------------------------------------------------------------
# Damaged state: a disposable cache is rebuilt; a train state is named in one line

def test_damaged_cache_is_rebuilt_and_leftovers_removed(toy, chat, tmp_path, monkeypatch, capsys):
    """Each damage a kill, a full disk or a person leaves (ids.npy cut in half, offsets.npy emptied, stats.json cut
    or deleted, a garbled header, an offsets array of another set, an id the tokenizer does not have) fails the check
    on load and the cache is rebuilt, the same as before. They used to give `mmap length is greater than file size`,
    EOFError, JSONDecodeError, `Directory not empty` and (the ids) an IndexError in training. Temporary dirs of builds killed on this host are removed by the next build."""
    cache = tmp_path / "cache"
    builds = []
    monkeypatch.setattr(tokenized, "build_sft", lambda *a, **k: builds.append(1) or build_sft(*a, **k))
    first = sft_dataset(toy.sft, "train", None, chat, 2048, "drop", cache)
    path = cache / f"sft-{fingerprint(toy.sft, 'train', None, chat, [2048, 'drop'])}"
    want = {name: np.load(path / f"{name}.npy").copy() for name in ("ids", "mask", "offsets")}
    other = sft_dataset(toy.sft, "train", None, chat, 60, "drop", cache)  # another set: fewer conversations
    assert len(other) < len(first) and len(builds) == 2

    def cut(name):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:len(data) // 2])

    def id_at_7(value):  # a valid ids.npy of the right shape and dtype: training indexed past the embedding with it
        ids = want["ids"].copy()
        ids[7] = value
        np.save(path / "ids.npy", ids)

    damages = {"ids.npy cut": lambda: cut("ids.npy"), "offsets.npy 0 bytes": lambda: (path / "offsets.npy").write_bytes(b""),
               "stats.json cut": lambda: cut("stats.json"), "stats.json deleted": lambda: (path / "stats.json").unlink(),
               "mask.npy garbled": lambda: (path / "mask.npy").write_bytes(b"\x93NUMPY garbage" * 8),
               "other offsets": lambda: np.save(path / "offsets.npy", np.asarray(other.offsets)),
               "an id past the tokenizer": lambda: id_at_7(chat.vocab_size), "a negative id": lambda: id_at_7(-1)}
    for i, (name, damage) in enumerate(damages.items()):
        damage()
        ds = sft_dataset(toy.sft, "train", None, chat, 2048, "drop", cache)
        assert len(builds) == 3 + i, name
        assert "token cache damaged" in capsys.readouterr().out, name
        for key, array in want.items():
            assert np.array_equal(getattr(ds, key), array), (name, key)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid whose process is gone
    host = socket.gethostname()
    left = {f".sft-x.tmp-{dead}": False, f".sft-x.tmp-{host}-{dead}": False, f".sft-y.damaged-{host}-{dead}": False,
            f".sft-x.tmp-{host}-{os.getppid()}": True, f".sft-x.tmp-elsewhere-{dead}": True}  # name: kept
    for name in left:
        (cache / name).mkdir()
        (cache / name / "ids.npy").write_bytes(b"half")
    sft_dataset(toy.sft, "train", None, chat, 100, "drop", cache)  # a build
    assert {name: (cache / name).exists() for name in left} == left
    assert not list(cache.glob("*.lock"))


def test_full_disk_while_building_the_cache_is_one_line(toy, chat, tmp_path):
    """A real tmpfs too small for the cache: `no space left on <cache dir>` (it was numpy's "2796 requested and 992
    written"), and nothing left in it."""
    with tmpfs(tmp_path / "disk", "12k") as disk:
        with pytest.raises(RunDirError, match=f"^no space left on {disk / 'cache'} \\(writing sft-[0-9a-f]+\\)"):
            sft_dataset(toy.sft, "train", None, chat, 2048, "drop", disk / "cache")
        assert list((disk / "cache").iterdir()) == []


def test_nonfinite_weights_on_one_rank_stop_every_rank_with_its_line(tmp_path):
    """Before a checkpoint every rank checks the weights it holds (its shard under FSDP): a NaN on one rank stops
    both, that rank with its one line, the other quietly (it said a second line, "in another rank's shard")."""
    def check(rank):
        model = torch.nn.Linear(3, 2)
        if rank == 1:
            with torch.no_grad():
                model.bias[0] = float("nan")
        check_finite_weights(model, 7)
        torch.distributed.barrier()  # the next collective

    (code0, err0), (code1, err1) = on_ranks(2, tmp_path, check)
    assert (code0, err0) == (1, "")
    assert (code1, err1) == (1, "error: step 7: non-finite weights (bias): not saved; lower --lr or resume from an "
                                "earlier checkpoint\n")


def on_ranks(world, tmp_path, fn):
    """Run fn(rank) on `world` gloo ranks, processes forked from this one (no torch import to wait for) with the
    scripts' one-line error hook; returns [(exit code, stderr)] by rank."""
    import multiprocessing

    from nanoalign.train import one_line_errors

    def rank_main(rank):
        sys.stderr = open(tmp_path / f"stderr{rank}", "w")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank,
                                             world_size=world)
        one_line_errors()
        code = 0
        try:
            fn(rank)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            sys.excepthook(type(e), e, e.__traceback__)
            code = 1
        sys.stderr.flush()
        os._exit(code)

    procs = [multiprocessing.get_context("fork").Process(target=rank_main, args=(r,)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [(p.exitcode, (tmp_path / f"stderr{r}").read_text()) for r, p in enumerate(procs)]


def test_damaged_train_state_is_one_line_and_old_layouts_resume(tmp_path, monkeypatch):
    """A train state cut in half, or replaced by something that unpickles to another object, is one line naming the
    file (it was `KeyError: 'optimizer'`, TypeError). A checkpoint of the earlier layout (train_state_rank<r>.pt, one
    a DDP rank) still resumes, on as many ranks or on more (rank 0's optimizer state serves a rank without a file)."""
    model = torch.nn.Linear(3, 2)
    optimizer, scaler = make_optimizer(model, 1e-2, 0.0), make_scaler(torch.device("cpu"), "fp32")
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "ckpt-1"
    save_train_state(ckpt, optimizer, scaler, 1, args={"lr": 1e-2})
    want = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    assert [p.name for p in ckpt.iterdir()] == ["train_state.pt"]

    def load(**kwargs):
        fresh = make_optimizer(model, 1e-2, 0.0)
        state = load_train_state(ckpt, fresh, scaler, **kwargs)
        assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], want)
        return state

    assert load()["step"] == 1
    state_file = ckpt / "train_state.pt"
    good = state_file.read_bytes()
    for bad, why in ((good[:len(good) // 2], "is unreadable \\(\\w+\\)"), (b"", "is unreadable \\(\\w+\\)")):
        state_file.write_bytes(bad)
        with pytest.raises(InputError, match=f"^cannot resume: {state_file} {why}; resume from an earlier checkpoint$"):
            load()
    for other in ([1, 2, 3], {"step": 1, "rng": None}, {"optimizer": 1, "scaler": {}, "step": "1", "rng": []}):
        torch.save(other, state_file)
        with pytest.raises(InputError, match=f"^cannot resume: {state_file} is not a train state \\(damaged or "
                                             f"replaced\\); resume from an earlier checkpoint$"):
            load()

    # the earlier layout, written by one rank: rank 0 and a rank 1 (a resume on 2 ranks) both get its optimizer state
    state_file.unlink()
    old = torch.load(__import__("io").BytesIO(good), weights_only=False)
    torch.save({**old, "rng": old["rng"][0]}, ckpt / "train_state_rank0.pt")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert load()["step"] == 1
    torch.save({**old, "rng": old["rng"][0], "args": {"fsdp": True}}, ckpt / "train_state_rank1.pt")
    with pytest.raises(InputError, match=f"^cannot resume {ckpt}: it was saved with --fsdp; resume it with --fsdp$"):
        load()

    # a resume that one rank refuses (its own file of the earlier layout is torn) stops both ranks with that rank's
    # one line; the other exits quietly instead of dying in its next collective with a gloo traceback
    torch.save({**old, "rng": old["rng"][0], "args": {}}, ckpt / "train_state_rank1.pt")
    (ckpt / "train_state_rank1.pt").write_bytes((ckpt / "train_state_rank1.pt").read_bytes()[:100])
    (ckpt / MARKER).write_text(json.dumps({"step": 1, "world_size": 2}))
    monkeypatch.delenv("RANK")

    def resume_then_train(rank):
        load_train_state(ckpt, make_optimizer(model, 1e-2, 0.0), scaler)
        torch.distributed.barrier()  # the next collective

    (code0, err0), (code1, err1) = on_ranks(2, tmp_path, resume_then_train)
    assert (code0, err0) == (1, "")
    assert (code1, err1) == (1, f"error: cannot resume: {ckpt / 'train_state_rank1.pt'} is unreadable "
                                f"(RuntimeError); resume from an earlier checkpoint\n")
