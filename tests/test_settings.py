"""Results are never kept without the settings that made them (nanoalign/rundir.py check_settings, as the five
scripts call it): every flag is recorded or declared free, a rerun or a --resume with another recorded value stops
naming it, results without a readable record are refused, and --overwrite moves everything or nothing (a real
SIGKILL in the middle of the move).

The scripts run in this process (runpy) up to their check_settings call, which runs for real on real files; what
comes after it (loading models, sampling, training) is not what these tests are about, and is skipped."""
import argparse
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoalign import rundir
from nanoalign.rundir import MARKER, SETTINGS, RunDirError
from tests.fixtures import ROOT

CPU = ("--device", "cpu", "--precision", "fp32")
SCRIPTS = {  # the least each script needs to reach check_settings
    "train_sft.py": ("--model", "m", "--data", "d", *CPU),
    "train_dpo.py": ("--model", "m", "--data", "d", *CPU),
    "gen_synthetic.py": ("--model", "m", "--reward", "toy", *CPU),
    "eval_winrate.py": ("--model-a", "m", "--model-b", "m", "--reward", "toy", *CPU),
    "gen_pairs_chat.py": ("--url", "http://127.0.0.1:9/v1", "--model", "m"),
}


class Reached(Exception):
    """check_settings accepted the run: the script stops here."""


REAL = argparse.ArgumentParser.parse_args, rundir.settings_from, rundir.check_settings


def until_recorded(monkeypatch, script, out, *args):
    """Run `script --out out *args` in this process up to and including its check_settings call. Returns what it
    recorded (parser, free, settings); a refusal raises RunDirError, as the real run would before any work."""
    seen = {}
    parse_args, settings_from, check_settings = REAL

    def parse(parser, *a, **kw):
        seen["parser"] = parser
        return parse_args(parser, *a, **kw)

    def record(args, free, unused=(), **kw):
        seen["free"], seen["unused"] = free, unused
        return settings_from(args, free, unused, **kw)

    def check(out, settings, *a, **kw):
        check_settings(out, settings, *a, **kw)
        seen["settings"] = settings
        raise Reached

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    monkeypatch.setattr(rundir, "settings_from", record)
    monkeypatch.setattr(rundir, "check_settings", check)
    monkeypatch.setattr(rundir, "lock_out_dir", lambda out, device=None: Path(out).mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script's one_line_errors sets it
    monkeypatch.setattr(sys, "argv", [script, *SCRIPTS[script], "--out", str(out), *map(str, args)])
    with torch.random.fork_rng():
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except Reached:
            return SimpleNamespace(**seen)
    raise AssertionError(f"{script} ended before check_settings")


def refusal(monkeypatch, script, out, *args):
    with pytest.raises(RunDirError) as e:
        until_recorded(monkeypatch, script, out, *args)
    return str(e.value)


def files(out):
    """{relative path: bytes} of every file under `out` but the lock."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def start_fresh(out, what="its results"):
    return f"use another --out, or --overwrite to move {what} to {out}/replaced-<time>/ and start fresh"


# -----------------------------------------------------------------------------
# Every flag of every script is recorded, or declared free in the script's FREE and in the README

def readme_free(script, parser):
    """The dests of the flags README's "Reruns with other settings" lists as free for `script`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("- **Reruns with other settings.**"):text.index("- **Disk per checkpoint**")]
    (item,) = re.findall(rf"^  - `{re.escape(script)}`: (.*(?:\n    .*)*)", section, flags=re.M)
    return {parser._option_string_actions[flag].dest for flag in re.findall(r"`(--[a-z][a-z0-9-]*)`", item)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_recorded_or_free(monkeypatch, tmp_path, script):
    """A flag that changes what is computed is in run_settings.json (--margin-clamp, --policy-url* were not); one that
    does not is in the script's FREE, and README lists exactly those. (A flag added later is recorded unless it is
    declared free: nothing to forget.)"""
    run = until_recorded(monkeypatch, script, tmp_path / "out")
    flags = {a.dest for a in run.parser._actions if a.dest != "help"}
    recorded = {run.parser._option_string_actions[flag].dest
                for key in run.settings for flag in re.findall(r"--[a-z][a-z0-9-]*", key)}
    recorded |= set(run.unused)  # recorded in a run they apply to (e.g. --lora-r with --lora)
    assert not recorded & set(run.free), sorted(recorded & set(run.free))
    assert recorded | set(run.free) == flags, sorted(flags - recorded - set(run.free))
    assert readme_free(script, run.parser) == set(run.free)
    assert json.loads((tmp_path / "out" / SETTINGS).read_text()) == run.settings
    must = {"train_dpo.py": {"--margin-clamp", "--beta", "--loss-type"}, "gen_synthetic.py": {"--policy-url"},
            "eval_winrate.py": {"--policy-url-a", "--policy-url-b", "--tie-eps"},
            "train_sft.py": {"--lr", "--pack", "global batch (--batch-size x --grad-accum x ranks)"},
            "gen_pairs_chat.py": {"--url", "--template (sha256 of its text)"}}[script]
    assert must <= set(run.settings)


# -----------------------------------------------------------------------------
# A rerun with another recorded value stops, naming it

URL = "http://127.0.0.1:9/v1"


@pytest.mark.parametrize("script,result,first,second,named", [
    # a resume with another clamp (which changes the loss) was accepted while --beta was refused
    ("train_dpo.py", "metrics.jsonl", ("--margin-clamp", 0), ("--margin-clamp", 5), "--margin-clamp 5.0 (was 0.0)"),
    # partly judged with a local model A, then with A from a server: one win rate mixed both
    ("eval_winrate.py", "per_prompt.jsonl", (), ("--policy-url-a", URL), f"--policy-url-a {URL!r} (was None)"),
    # the refusal named no setting at all: "holds a run with other settings: ;"
    ("gen_synthetic.py", "samples.jsonl", (), ("--policy-url", URL),
     f"--policy-url {URL!r} (was None), --policy-model None (not recorded)"),  # (a local policy has no model name)
    ("gen_synthetic.py", "samples.jsonl", ("--policy-url", URL), ("--policy-url", URL, "--policy-model", "q"),
     "--policy-model 'q' (was None)"),
])
def test_a_rerun_with_another_recorded_value_stops(monkeypatch, tmp_path, script, result, first, second, named):
    out = tmp_path / "out"
    until_recorded(monkeypatch, script, out, *first)
    (out / result).write_text('{"prompt_id": "p0"}\n')  # the first run wrote a result
    before = files(out)
    assert refusal(monkeypatch, script, out, *second) == (
        f"{out} holds a run with other settings: {named}; {start_fresh(out)}")
    assert files(out) == before
    until_recorded(monkeypatch, script, out, *first)  # the same settings go on
    until_recorded(monkeypatch, script, out, *first, "--max-prompts" if "gen" in script or "eval" in script
                   else "--save-every", 3)  # and so does a free flag


# -----------------------------------------------------------------------------
# A model retrained in place, or a data file edited, under the same path is another setting

def rewrite(path, text):
    """Write `text` to `path` as a retraining or an edit would: a new file, with a later mtime."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(old + 10**9, old + 10**9))


@pytest.mark.parametrize("script,flag,result", [
    # the QA replay's S01: eval of sft/final, SFT redone into the same --out, the same eval again: 3 of 12 answers
    # came from the old model, and one summary mixed both
    ("eval_winrate.py", "--model-a", "per_prompt.jsonl"),
    # S02: the same with gen_synthetic.py --model: pairs built from both models' samples
    ("gen_synthetic.py", "--model", "samples.jsonl"),
    # S03: SFT killed, its --data file edited, then --resume auto went on over the new data without a word
    ("train_sft.py", "--data", "metrics.jsonl"),
    ("train_dpo.py", "--adapter", "metrics.jsonl"),
])
def test_files_changed_under_the_same_path_are_another_setting(monkeypatch, tmp_path, script, flag, result):
    model = tmp_path / "model"
    model.mkdir()
    rewrite(model / "model.safetensors", "weights of the first training")
    data = tmp_path / "data.jsonl"
    rewrite(data, '{"messages": []}\n')
    given = {"--model-a": model, "--model": model, "--data": data, "--adapter": model}[flag]
    out = tmp_path / "out"
    until_recorded(monkeypatch, script, out, flag, given)
    (out / result).write_text('{"prompt_id": "p0", "step": 1}\n')
    recorded = json.loads((out / SETTINGS).read_text())
    until_recorded(monkeypatch, script, out, flag, given)  # read, not changed: the same run goes on
    target = data if flag == "--data" else model / "model.safetensors"
    rewrite(target, "weights of the second training" if target != data else '{"messages": [], "x": 1}\n')
    before = files(out)
    message = refusal(monkeypatch, script, out, flag, given)
    key = f"{flag}{rundir.FILES}"
    assert message.startswith(f"{out} holds a run with other settings: {key} ") and "(was " in message, message
    assert f"(was {recorded[key]!r})" in message and files(out) == before


def test_an_older_record_without_files_digests_is_taken_and_completed(monkeypatch, tmp_path):
    """Records written before the digests existed hold paths only: the run goes on (its files are taken for what
    made the results), and the record gains the digests."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    out = tmp_path / "out"
    until_recorded(monkeypatch, "gen_synthetic.py", out, "--model", model)
    (out / "samples.jsonl").write_text('{"prompt_id": "p0"}\n')
    record = json.loads((out / SETTINGS).read_text())
    older = {k: v for k, v in record.items() if not k.endswith(rundir.FILES)}
    assert len(older) == len(record) - 1
    (out / SETTINGS).write_text(json.dumps(older))
    until_recorded(monkeypatch, "gen_synthetic.py", out, "--model", model)
    assert json.loads((out / SETTINGS).read_text()) == record


# -----------------------------------------------------------------------------
# Results without a readable record are refused, not taken for a fresh start

def test_results_without_a_readable_record_are_refused(monkeypatch, tmp_path):
    """run_settings.json deleted, cut or 0 bytes beside samples.jsonl: a rerun (here with another --temperature,
    which used to mix both into samples.jsonl, or a JSONDecodeError traceback) stops with one line naming what is
    there; --overwrite moves it all aside and starts fresh."""
    out = tmp_path / "synth"
    until_recorded(monkeypatch, "gen_synthetic.py", out, "--temperature", 1.0)
    record = (out / SETTINGS).read_text()
    (out / "samples.jsonl").write_text('{"prompt_id": "p0", "sample": 0, "response": "7", "score": 1.0}\n')
    (out / "pairs.jsonl").write_text("")
    for damage, problem in (("deleted", "is missing"), (record[:len(record) // 2], "is damaged (not a JSON object)"),
                            ("", "is damaged (not a JSON object)"), ("[]", "is damaged (not a JSON object)")):
        if damage == "deleted":
            (out / SETTINGS).unlink()
        else:
            (out / SETTINGS).write_text(damage)
        before = files(out)
        assert refusal(monkeypatch, "gen_synthetic.py", out, "--temperature", 0.5) == (
            f"{out / SETTINGS} {problem}, so the results in {out} (pairs.jsonl, samples.jsonl) have no record of the "
            f"settings that made them; {start_fresh(out, 'them')}")
        assert files(out) == before
    run = until_recorded(monkeypatch, "gen_synthetic.py", out, "--temperature", 0.5, "--overwrite")
    (backup,) = out.glob("replaced-*")
    assert sorted(files(backup)) == ["pairs.jsonl", "run_settings.json", "samples.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == [backup.name, SETTINGS]
    assert json.loads((out / SETTINGS).read_text()) == run.settings and run.settings["--temperature"] == 0.5


def test_checkpoints_carry_the_record(monkeypatch, tmp_path):
    """A training dir whose run_settings.json is gone still knows its settings: each checkpoint's marker carries
    them, so a rerun with another --lr is refused (it used to start afresh over the old metrics) and one with the
    same settings restores the record."""
    out = tmp_path / "sft"
    run = until_recorded(monkeypatch, "train_sft.py", out, "--lr", 0.01)
    with rundir.checkpoint(out / "ckpt-1"):  # what the script's save() writes around the weights
        pass
    assert json.loads((out / "ckpt-1" / MARKER).read_text())["settings"] == run.settings
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / SETTINGS).unlink()
    assert refusal(monkeypatch, "train_sft.py", out, "--lr", 0.02) == (
        f"{out} holds a run with other settings: --lr 0.02 (was 0.01); {start_fresh(out)}")
    assert not (out / SETTINGS).exists()
    until_recorded(monkeypatch, "train_sft.py", out, "--lr", 0.01, "--resume", "auto")
    assert json.loads((out / SETTINGS).read_text()) == run.settings


def test_resume_of_another_runs_checkpoint_is_compared(monkeypatch, tmp_path):
    """--resume <a checkpoint of another run> into a fresh --out under another --lr used to train on: the
    checkpoint's own record is compared and the run stops, naming the setting; under the same settings it goes on."""
    first = tmp_path / "first"
    until_recorded(monkeypatch, "train_sft.py", first, "--lr", 0.01, "--max-steps", 4)
    with rundir.checkpoint(first / "ckpt-2"):
        pass
    ckpt = first / "ckpt-2"
    assert refusal(monkeypatch, "train_sft.py", tmp_path / "second", "--lr", 0.02, "--max-steps", 4,
                   "--resume", ckpt) == (
        f"--resume {ckpt} was written by a run with other settings: --lr 0.02 (was 0.01); resume it with those, or "
        f"start without --resume")
    assert files(tmp_path / "second") == {}
    until_recorded(monkeypatch, "train_sft.py", tmp_path / "second", "--lr", 0.01, "--max-steps", 4, "--resume", ckpt)


# -----------------------------------------------------------------------------
# --overwrite moves everything or nothing

KILL_AFTER_THE_RECORD_MOVES = """
import os, runpy, signal, sys
from pathlib import Path
record = Path(sys.argv[1]) / "run_settings.json"
def killing(rename):
    def renamed(*args, **kwargs):  # the record has left: die before the next move (or the new record) lands
        if not record.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(*args, **kwargs)
    return renamed
os.rename, os.replace = killing(os.rename), killing(os.replace)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_overwrite_leaves_the_earlier_run(monkeypatch, tmp_path):
    """gen_synthetic.py --overwrite SIGKILLed while moving the earlier run aside (its record already moved, its
    samples not yet): a plain rerun with the new settings used to reuse the temperature-1.0 samples as 0.5 ones. Now
    the next start puts the earlier run back whole and refuses; a new --overwrite then moves all of it."""
    out = tmp_path / "synth"
    until_recorded(monkeypatch, "gen_synthetic.py", out, "--temperature", 1.0)
    (out / "samples.jsonl").write_text('{"prompt_id": "p0", "sample": 0, "response": "7", "score": 1.0}\n')
    (out / "pairs.jsonl").write_text("")
    (out / "summary.json").write_text('{"samples": 1}\n')
    before = files(out)
    argv = [*SCRIPTS["gen_synthetic.py"], "--out", out, "--temperature", 0.5, "--overwrite"]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_THE_RECORD_MOVES, str(out), "gen_synthetic.py",
                           *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / SETTINGS).exists()  # killed in the middle of the move

    assert refusal(monkeypatch, "gen_synthetic.py", out, "--temperature", 0.5) == (
        f"{out} holds a run with other settings: --temperature 0.5 (was 1.0); {start_fresh(out)}")
    assert files(out) == before and not list(out.glob("replaced-*")) and not (out / ".replacing").exists()
    until_recorded(monkeypatch, "gen_synthetic.py", out, "--temperature", 0.5, "--overwrite")
    (backup,) = out.glob("replaced-*")
    assert files(backup) == before
