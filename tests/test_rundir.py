"""Runs that survive (nanoalign/rundir.py and its callers), each fault made for real: torn checkpoint files and a
missing marker, a SIGKILL mid-run, a second process on the output dir, a full and a read-only tmpfs (skipped
where no tmpfs can be mounted), rerun settings that differ, nonsense flags, damaged model and data files."""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from nanoalign import toy
from nanoalign.chat import load_chat
from nanoalign.data import prompt_records, read_records
from nanoalign.model import CausalLM, ModelConfig, load_config, load_model, save_model
from nanoalign.rundir import MARKER, latest_checkpoint, lock_out_dir
from nanoalign.train import Number, Weights, nonneg_int, positive_float, positive_int, probability
from tests.fixtures import (ROOT, cached_toy_setup, json_server, max_weight_diff, read_metrics, read_weights,
                            run_script, tmpfs)

FP32 = ("--device", "cpu", "--precision", "fp32")
SFT = ("--lr", 1e-2, "--batch-size", 4, "--eval-frac", 0, "--no-pack")  # batches of conversations


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


def sft(toy_setup, out, *args, check=True):
    return run_script("train_sft.py", "--model", toy_setup.model, "--data", toy_setup.sft, "--out", out, *FP32,
                      *args, check=check)


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


def ckpt_dirs(out):
    return sorted(p.name for p in Path(out).glob("ckpt-*"))


# -----------------------------------------------------------------------------
# Checkpoints: torn files are never resumed, --keep-checkpoints, one metrics row per step

def test_torn_checkpoints_are_skipped_and_only_n_kept(toy_setup, tmp_path):
    """A kill leaves ckpt-8 with half a train state and ckpt-6 with a 0-byte one, neither with the marker, and
    metrics rows up to step 7: --resume auto falls back to ckpt-4 and ends with the uninterrupted run's weights and
    exactly one metrics row per step. --keep-checkpoints 3 leaves the newest 3."""
    args = (*SFT, "--max-steps", 8, "--save-every", 2, "--keep-checkpoints", 3)
    full_dir, out = tmp_path / "full", tmp_path / "resumed"
    sft(toy_setup, full_dir, *args)
    full = read_metrics(full_dir)
    assert ckpt_dirs(full_dir) == ["ckpt-4", "ckpt-6", "ckpt-8"]
    assert all((full_dir / c / MARKER).is_file() for c in ckpt_dirs(full_dir))
    record = json.loads((full_dir / "run_settings.json").read_text())  # each marker carries it (see test_settings.py)
    assert all(json.loads((full_dir / c / MARKER).read_text())["settings"] == record for c in ckpt_dirs(full_dir))

    out.mkdir()
    for name in ("ckpt-4", "ckpt-6", "ckpt-8", "run_settings.json"):
        (shutil.copytree if name.startswith("ckpt") else shutil.copy)(full_dir / name, out / name)
    state8 = out / "ckpt-8" / "train_state.pt"
    state8.write_bytes(state8.read_bytes()[:state8.stat().st_size // 2])
    (out / "ckpt-6" / "train_state.pt").write_bytes(b"")
    for name in ("ckpt-6", "ckpt-8"):
        (out / name / MARKER).unlink()
    lines = (full_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:7]) + lines[7][:20])  # killed while logging step 8

    proc = sft(toy_setup, out, *args, "--resume", "auto")
    assert f"resumed from {out / 'ckpt-4'} at step 4" in proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r, r_full in zip(rows[4:], full[4:]):
        assert r["loss"] == pytest.approx(r_full["loss"], abs=1e-6), r["step"]
    assert max_weight_diff(read_weights(out / "final"), read_weights(full_dir / "final")) < 1e-6
    assert ckpt_dirs(out) == ["ckpt-4", "ckpt-6", "ckpt-8"]
    assert all((out / c / MARKER).is_file() for c in ckpt_dirs(out))  # the torn ones were rewritten whole
    assert not list(out.rglob(".*.tmp*"))

    # resuming with another batch size and lr stops at once, naming both, and touches nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = sft(toy_setup, out, *args, "--resume", "auto", "--lr", 0.02, "--batch-size", 2, check=False)
    line = last_line(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert line.startswith(f"error: {out} holds a run with other settings: ") and "--overwrite" in line, line
    assert "--lr 0.02 (was 0.01)" in line and "(--batch-size x --grad-accum x ranks) 2 (was 4)" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_explicit_resume_of_an_incomplete_checkpoint_is_one_line(toy_setup, tmp_path):
    ckpt = tmp_path / "out" / "ckpt-2"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path / "out") is None
    proc = sft(toy_setup, tmp_path / "out", *SFT, "--max-steps", 2, "--resume", ckpt, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert last_line(proc.stderr) == (f"error: --resume {ckpt}: incomplete checkpoint (no {MARKER}: cut off while "
                                      f"being written); pick an earlier one or --resume auto")


def test_sigkill_mid_run_then_resume(toy_setup, tmp_path):
    """A real SIGKILL once metrics passed step 7 (checkpoints every 2 steps, some possibly mid-write): the resumed
    run starts at its newest complete checkpoint, and metrics.jsonl ends with one row per step."""
    out = tmp_path / "killed"
    steps = 40
    args = (*SFT, "--max-steps", steps, "--save-every", 2, "--keep-checkpoints", 2, "--schedule", "constant")
    cmd = [sys.executable, "train_sft.py", "--model", toy_setup.model, "--data", toy_setup.sft, "--out", out, *FP32,
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([str(a) for a in cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 7:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    logged = len(read_metrics(out))
    newest = latest_checkpoint(out)
    assert newest is not None and int(newest.name.split("-")[1]) <= logged < steps

    proc = sft(toy_setup, out, *args, "--resume", "auto")
    assert f"resumed from {newest}" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))
    assert ckpt_dirs(out) == [f"ckpt-{steps - 2}", f"ckpt-{steps}"]


def test_torn_reference_cache_is_recomputed(toy_setup, tmp_path):
    """--precompute-ref finds half a ref_logps.pt (a kill during the old torch.save): it says so and recomputes."""
    out = tmp_path / "dpo"
    out.mkdir()
    torch.save({"fingerprint": {}, "logps": {str(i): (-1.0 * i, -2.0 * i) for i in range(500)}}, out / "ref_logps.pt")
    data = (out / "ref_logps.pt").read_bytes()
    (out / "ref_logps.pt").write_bytes(data[:len(data) // 2])
    proc = run_script("train_dpo.py", "--model", toy_setup.model, "--data", toy_setup.prefs, "--out", out, *FP32,
                      "--max-steps", 1, "--batch-size", 4, "--eval-frac", 0, "--save-every", 0, "--precompute-ref")
    assert f"{out / 'ref_logps.pt'} is unreadable" in proc.stdout
    cache = torch.load(out / "ref_logps.pt", weights_only=False)
    assert len(cache["logps"]) >= 4 and cache["fingerprint"]["max_len"] == 1024  # at least the 4 pairs of step 1


# -----------------------------------------------------------------------------
# The output-dir lock

def hold_lock(out):
    """A second, real process that holds <out>/.lock (via rundir.lock_out_dir) until killed."""
    code = ("import sys, time; from nanoalign.rundir import lock_out_dir; lock_out_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_locked_out_dir_fails_at_once(toy_setup, tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        expected = (f"error: {out} is in use by another run (pid {holder.pid}); wait for it to finish, or choose "
                    f"another --out")
        for nproc in (1, 2):  # under torchrun rank 0 holds the lock and every rank stops
            t0 = time.time()
            proc = run_script("train_sft.py", "--model", toy_setup.model, "--data", toy_setup.sft, "--out", out,
                              *FP32, *SFT, "--max-steps", 2, nproc=nproc, check=False, timeout=120)
            assert proc.returncode != 0 and (nproc > 1 or "Traceback" not in proc.stderr), proc.stderr
            # torch prefixes what a rank's excepthook prints with "[rank<r>]: "; then torchrun's own report
            assert (f"[rank0]: {expected}" if nproc > 1 else expected) in proc.stderr.splitlines(), proc.stderr[-2000:]
            assert time.time() - t0 < 60
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock went with it, and the next run takes the dir
    holder = hold_lock(out)
    holder.kill()
    holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)


def test_the_next_run_removes_the_temporary_files_killed_runs_left(tmp_path, capsys):
    """A kill mid-write leaves atomic_path's .<name>.tmp<pid> (up to a whole checkpoint file, in final/ and ckpt-*/
    too) that nothing removed. The next run into the dir, once it holds the lock, removes those of dead processes
    anywhere under --out (a dead pid that is now this process's too: it has written nothing yet), never a live
    process's, nor files of other names."""
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    out = tmp_path / "out"
    debris = [out / f".model.safetensors.tmp{dead.pid}", out / "final" / f".adapter_model.safetensors.tmp{dead.pid}",
              out / "ckpt-4" / f".train_state_rank0.pt.tmp{dead.pid}",
              out / "replaced-20250101-000000" / f".run_settings.json.tmp{os.getpid()}"]
    others = [out / "ckpt-4" / f".train_state_rank1.pt.tmp{live.pid}", out / "ckpt-4" / "model.safetensors",
              out / f"notes.tmp{dead.pid}", out / f".notes.tmp{dead.pid}x"]
    for i, path in enumerate(debris + others):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (1000 + i))
    try:
        lock_out_dir(out)
    finally:
        live.kill()
        live.wait()
    assert capsys.readouterr().out == f"removed 4 temporary files (4,006 bytes) that killed runs left in {out}\n"
    assert not any(p.exists() for p in debris) and all(p.exists() for p in others)


# -----------------------------------------------------------------------------
# A full disk and a read-only --out, on a real tmpfs

def test_full_disk_is_one_line_and_keeps_the_finished_checkpoint(toy_setup, tmp_path):
    """A tmpfs with room for one checkpoint: ckpt-2 runs out of space; the run stops with one line naming the dir,
    ckpt-1 stays complete (so --resume auto trusts it) and no temporary file is left."""
    with tmpfs(tmp_path / "disk", "2200k") as disk:
        out = disk / "run"
        proc = sft(toy_setup, out, *SFT, "--max-steps", 3, "--save-every", 1, "--keep-checkpoints", 0, check=False)
        line = last_line(proc.stderr)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert line.startswith(f"error: no space left on {out / 'ckpt-2'} (writing "), line
        assert latest_checkpoint(out) == out / "ckpt-1"
        assert not list(out.rglob(".*.tmp*"))
        assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_read_only_out_is_one_line_before_any_work(toy_setup, tmp_path):
    with tmpfs(tmp_path / "ro", "64k", readonly=True) as ro:
        for script, args in (("train_sft.py", ("--model", toy_setup.model, "--data", toy_setup.sft)),
                             ("gen_synthetic.py", ("--model", toy_setup.model, "--prompts", toy_setup.sft))):
            proc = run_script(script, *args, "--out", ro / "run", *FP32, check=False)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert last_line(proc.stderr) == f"error: --out {ro / 'run'}: cannot write there (Read-only file system)"
            assert proc.stdout == ""  # not even the data was read


# -----------------------------------------------------------------------------
# Nonsense flags

def test_argument_types():
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and positive_float("1e-5") == 1e-5
    assert probability("1") == 1.0 and probability("0.95") == 0.95
    for fn, text in ((positive_int, "0"), (positive_int, "-1"), (positive_int, "2.5"), (nonneg_int, "-3"),
                     (positive_float, "0"), (positive_float, "nan"), (positive_float, "-0.1"),
                     (probability, "0"), (probability, "1.5"), (probability, "nan")):
        with pytest.raises(Exception, match=f"must be .*, got '{text}'"):
            fn(text)


# Every numeric option of every script, by rule: its type is a range-checked Number, NaN, infinities and the values
# just past each end of its range fail at parsing (exit 2, argparse's one line naming the flag), its default and
# values inside the range parse. The parsers are taken from the scripts themselves, in this process.

SCRIPT_ARGS = {  # each script's required flags
    "train_sft.py": ("--model", "m", "--data", "d", "--out", "o"),
    "train_dpo.py": ("--model", "m", "--data", "d", "--out", "o"),
    "gen_synthetic.py": ("--model", "m", "--out", "o"),
    "eval_winrate.py": ("--model-a", "m", "--model-b", "m", "--out", "o"),
    "gen_pairs_chat.py": ("--url", "u", "--model", "m", "--out", "o"),
}


class _Parser(Exception):
    pass


@functools.cache
def script_parser(script):
    """The script's ArgumentParser: the script runs here up to its parse_args, which raises instead of parsing."""
    def stop(parser, *args, **kwargs):
        raise _Parser(parser)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            runpy.run_path(str(ROOT / script))
        except _Parser as e:
            return e.args[0]
    raise AssertionError(f"{script} never called parse_args")


def parse(script, *flags):
    """(0, namespace), or (exit status, stderr) of parsing the script's required flags and `flags`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return 0, script_parser(script).parse_args([*SCRIPT_ARGS[script], *flags])
        except SystemExit as e:
            return e.code, stderr.getvalue()


def assert_refused(script, flag, value, want):
    status, stderr = parse(script, f"{flag}={value}")  # `=`: argparse takes "-inf" after a space for an option
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert status == 2 and errors == [f"{script}: error: argument {flag}: must be {want}, got {value!r}"], \
        (script, flag, value, status, stderr)


def numeric_options(script):
    """(flag, action) of each option whose value is a number; an option whose type is not a range-checked Number
    (type=float, type=int, or a numeric default and no type) fails here: a new numeric flag needs a range."""
    for action in script_parser(script)._actions:  # argparse's list of options (there is no public one)
        flag = "/".join(action.option_strings)
        numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        if action.type is None and not numeric_default:
            continue
        assert isinstance(action.type, Number), f"{script} {flag}: type {action.type!r} is not a nanoalign.train.Number"
        yield flag, action


def just_past(x, integer, direction):
    return x + direction if integer else math.nextafter(x, direction * math.inf)


@pytest.mark.parametrize("script", SCRIPT_ARGS)
def test_every_numeric_flag_has_a_range_checked_at_parsing(script):
    options = list(numeric_options(script))
    assert len(options) >= 6, options  # the parser was captured
    for flag, action in options:
        t = action.type
        if isinstance(t, Weights):
            for value in ("nan", "inf", "-1", "1,-0.5", "1,nan", "0,0", "0", "1,,2", "1;2", ""):
                assert_refused(script, flag, value, "comma-separated numbers >= 0, not all 0")
            for value, want in (("1,0.25", [1.0, 0.25]), ("0,2.5", [0.0, 2.5])):
                assert getattr(parse(script, flag, value)[1], action.dest) == want
            continue
        lo = just_past(t.lo, t.integer, 1) if t.lo_open else t.lo  # the ends of the range, inside it
        hi = just_past(t.hi, t.integer, -1) if t.hi_open else t.hi
        bad = ["nan", "inf", "-inf", "1e999", just_past(lo, t.integer, -1), t.lo - 1]
        good = [lo, lo + (1000 if t.integer else 0.5)]
        if hi < math.inf:
            bad.append(just_past(hi, t.integer, 1))
            good = [lo, hi, (lo + hi) // 2 if t.integer else (lo + hi) / 2]
        if t.integer:  # not an integer; past any float (isfinite(10**400) raises)
            bad.append(lo + 0.5)
            (good if hi == math.inf else bad).append(10 ** 400)
        for value in bad:
            assert_refused(script, flag, value if isinstance(value, str) else repr(value), t.want)
        assert action.default is None or action.default in t, (script, flag, action.default)
        for value in good + ([action.default] if action.default is not None else []):
            status, args = parse(script, f"{flag}={value!r}")
            assert status == 0 and getattr(args, action.dest) == value, (script, flag, value, args)


@pytest.mark.parametrize("script,flag,value,want", [  # the fault campaign's cases (issue #19): all accepted before
    ("train_sft.py", "--max-bad-steps", "-1", "an integer >= 0"),  # stopped a healthy run after step 1
    ("eval_winrate.py", "--tie-eps", "nan", "a number >= 0"),  # every prompt a tie
    ("eval_winrate.py", "--tie-eps", "-1", "a number >= 0"),  # W/L/T 12/12/-12
    ("gen_synthetic.py", "--reward-retries", "-1", "an integer >= 0"),  # no request, every score null
    ("gen_pairs_chat.py", "--temperature", "nan", "a number in [0, 2]"),  # a NaN request body, 0 pairs
    ("train_sft.py", "--chunk-size", "0", "an integer >= 1"),  # tracebacks
    ("train_dpo.py", "--chunk-size", "-4", "an integer >= 1"),
    ("train_sft.py", "--lora-dropout", "1.5", "a number in [0, 1)"),
    ("train_dpo.py", "--data-weights", "inf", "comma-separated numbers >= 0, not all 0"),
    ("gen_synthetic.py", "--reward-concurrency", "0", "an integer >= 1"),
    ("eval_winrate.py", "--policy-concurrency", "0", "an integer >= 1"),
    ("gen_synthetic.py", "--reward-timeout", "inf", "a number in (0, 1e+09]"),
    ("eval_winrate.py", "--reward-batch-size", "0", "an integer >= 1"),
    ("train_dpo.py", "--lora-r", "0", "an integer >= 1"),  # errors only at the first request or later
    ("gen_synthetic.py", "--policy-timeout", "nan", "a number in (0, 1e+09]"),
    ("gen_pairs_chat.py", "--timeout", "-1", "a number in (0, 1e+09]"),
    ("train_sft.py", "--lora-alpha", "nan", "a number > 0"),  # NaN steps, then the LR blamed
    ("train_dpo.py", "--label-smoothing", "nan", "a number in [0, 0.5)"),
    ("train_dpo.py", "--lr-step-gamma", "nan", "a number in (0, 1]"),
    ("gen_synthetic.py", "--min-gap", "nan", "a number >= 0"),  # acted as 0
    ("gen_synthetic.py", "--max-similarity", "-1", "a number in [0, 1]"),  # dropped every pair, exit 0
    ("train_sft.py", "--seed", "-1", "an integer in [0, 9223372036854775807]"),  # random.Random(-1) is Random(1)
    ("train_sft.py", "--eval-frac", "1", "a number in [0, 1)"),  # was checked after parsing, exit 1
])
def test_nonsense_flags_are_rejected_at_parsing(script, flag, value, want):
    assert_refused(script, flag, value, want)


def test_nonsense_flags_stop_before_any_request(toy_setup, tmp_path):
    """Against a working endpoint: gen_synthetic.py --reward-retries -1 scored every sample null without one request
    (and cached the nulls, so a corrected rerun did not ask either); gen_pairs_chat.py --temperature nan sent every
    prompt in a request body with a bare NaN (not JSON) and ended with 0 pairs, exit 0. Now: exit 2 at parsing,
    one line, no request, no --out."""
    requests = []

    def handle(path, headers, body):
        requests.append(path)
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "reward:0.5"},
                                  "logprobs": {"content": [{"token": "reward", "logprob": 0.5}]}}]}

    runs = {"--reward-retries": ("gen_synthetic.py", "--model", toy_setup.model, "--prompts", toy_setup.sft,
                                 "--num-samples", 3, "--reward", "{url}", "--reward-retries", -1, *FP32),
            "--temperature": ("gen_pairs_chat.py", "--url", "{url}", "--model", "gpt-test", "--prompts", toy_setup.sft,
                              "--temperature", "nan")}
    seen = {}
    with json_server(handle) as url:
        for flag, (script, *args) in runs.items():
            out = tmp_path / script
            proc = run_script(script, *[url if a == "{url}" else a for a in args], "--max-prompts", 12, "--out", out,
                              check=False)
            seen[flag] = (proc.returncode, len(requests), out.exists(), "Traceback" in proc.stderr,
                          f"error: argument {flag}: must be " in (proc.stderr.splitlines() or [""])[-1])
            requests.clear()
    assert seen == {flag: (2, 0, False, False, True) for flag in runs}, seen


def test_what_the_scripts_meet_after_parsing_is_one_line(toy_setup, tmp_path):
    """The QA replay of the fault campaign (issue #19) saw tracebacks or silence here; each is one line now, the five
    commands run side by side. A cut tokenizer_config.json (the chat template's file) was a JSONDecodeError; --device
    cuda without a GPU `no attribute '_cuda_setDevice'`, --device gpu0 `Invalid device string`; --max-new-tokens
    1000000000 a 1.6 TB KV cache (`can't allocate`); --temperature 0 with --num-samples 3 exit 0, every sample the same
    answer and no pair. Later: a tokenizer_config.json holding a JSON list; --num-samples 1 (no pair can form)."""
    model = shutil.copytree(toy_setup.model, tmp_path / "model")
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text()[:40])
    listed = shutil.copytree(toy_setup.model, tmp_path / "model_listed")
    (listed / "tokenizer_config.json").write_text("[1, 2]\n")  # JSON, but no object: was AttributeError 'list'
    prompts = ("--prompts", toy_setup.sft, "--max-prompts", 2, "--reward", "toy", "--max-new-tokens", 4, *FP32)
    evaluate = ("eval_winrate.py", "--model-b", toy_setup.model, *prompts)
    runs = {"cut": (*evaluate, "--model-a", model),
            "context": (*evaluate, "--model-a", toy_setup.model, "--max-new-tokens", 10 ** 9),
            "cuda": ("train_dpo.py", "--model", toy_setup.model, "--data", toy_setup.prefs, *FP32, "--device", "cuda"),
            "gpu0": ("gen_synthetic.py", "--model", toy_setup.model, *prompts, "--device", "gpu0"),
            "greedy": ("gen_synthetic.py", "--model", toy_setup.model, *prompts, "--temperature", 0,
                       "--num-samples", 3),
            "listed": (*evaluate, "--model-a", listed),
            "single": ("gen_synthetic.py", "--model", toy_setup.model, *prompts, "--num-samples", 1)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    procs = {case: subprocess.Popen([sys.executable, *map(str, argv), "--out", tmp_path / case], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for case, argv in runs.items()}
    seen = {case: (proc.wait(timeout=120), last_line(proc.stderr.read())) for case, proc in procs.items()}
    assert seen["cut"][0] == 1 and re.match(f"error: {re.escape(str(config))}:\\d+: malformed JSON: ",
                                            seen["cut"][1]), seen
    assert seen["context"][0] == 1 and re.fullmatch(
        r"error: the longest prompt plus --max-new-tokens need 10000000\d\d positions, more than the model's context "
        r"of 512 \(max_position_embeddings in its config.json\): lower --max-new-tokens \(or --max-prompt-len\)",
        seen["context"][1]), seen
    assert seen["cuda"][0] == 1 and seen["cuda"][1].startswith("error: --device cuda: no CUDA GPU is visible ("), seen
    assert seen["gpu0"] == (1, "error: --device 'gpu0' is not a device (e.g. cpu, cuda, cuda:1)"), seen
    assert seen["greedy"] == (2, "gen_synthetic.py: error: --temperature 0 with --num-samples 3: greedy decoding "
                                 "gives every sample of a prompt the same answer, so no pair could form"), seen
    assert seen["listed"] == (1, f"error: {listed / 'tokenizer_config.json'}: expected a JSON object {{...}}, "
                                 f"found list [1, 2]"), seen
    assert seen["single"] == (2, "gen_synthetic.py: error: --num-samples 1: a pair is the best and the worst of a "
                                 "prompt's samples, so it takes 2 or more"), seen  # was exit 0 and no pair, ever
    assert not any((tmp_path / case).exists() for case in ("cuda", "gpu0", "greedy", "single"))  # before any work


# -----------------------------------------------------------------------------
# Damaged model, tokenizer and data files: one line each, naming the file

def model_dir(toy_setup, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(toy_setup.model, path)
    return path


def test_damaged_model_files(toy_setup, tmp_path):
    path = model_dir(toy_setup, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for torn in (data[:len(data) // 2], b""):
        weights.write_bytes(torn)
        with pytest.raises(ValueError, match=f"^{weights}: not a readable safetensors file, truncated or damaged"):
            load_model(path)
    weights.write_bytes(data)

    config = path / "config.json"
    text = config.read_text()
    config.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f"^{config}:\\d+: malformed JSON"):
        load_config(path)
    config.write_text(text.replace('"num_key_value_heads": 2', '"num_key_value_heads": 3'))
    with pytest.raises(ValueError, match=f"^{config}: num_attention_heads \\(4\\) must be a multiple of "
                                         f"num_key_value_heads \\(3\\)"):
        load_config(path)

    tokenizer = path / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:100])
    with pytest.raises(ValueError, match=f"^{tokenizer}: not a readable tokenizer.json"):
        load_chat(path)


def test_tokenizer_larger_than_the_model_is_one_line_at_load(toy_setup, tmp_path):
    chat = load_chat(toy_setup.tokenizer)
    rows = chat.vocab_size - 12
    config = toy.tiny_config(rows, bos_token_id=chat.endoftext_id, eos_token_id=chat.im_end_id)
    small = save_model(CausalLM(ModelConfig.from_hf(config)).init_weights(seed=0), tmp_path / "small")
    proc = run_script("train_sft.py", "--model", small, "--tokenizer", toy_setup.tokenizer, "--data", toy_setup.sft,
                      "--out", tmp_path / "out", *FP32, *SFT, "--max-steps", 1, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc.stderr) == (f"error: tokenizer {toy_setup.tokenizer} has {chat.vocab_size} tokens but model "
                                      f"{small} has only {rows} embedding rows (vocab_size): they do not belong "
                                      f"together")


def read_all(path):
    return list(read_records(path))


def test_unclear_data_files_get_clear_lines(tmp_path, capsys):
    row = json.dumps({"prompt": "What is 2+2?"})
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(f"{row}\n{row}\n".encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{bad}:3: not UTF-8 text \\(byte 0xe9\\)"):
        read_all(bad)
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: (empty file|only blank lines) \\(no rows\\)"):
            read_all(tmp_path / name)
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps({"prompt": "What is 2+2?", "chosen": "4"}, indent=2))
    with pytest.raises(ValueError, match=f"^{pretty}: one JSON object spread over several lines"):
        read_all(pretty)

    dupes = tmp_path / "dupes.jsonl"
    dupes.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}, {"prompt_id": "x", "prompt": "c"},
        {"prompt_id": "x", "prompt": "d"}]))
    assert [m[0]["content"] for _, m in prompt_records(read_records(dupes))] == ["a", "b", "c"]
    assert "prompts: dropped 2 duplicate(s)" in capsys.readouterr().out
