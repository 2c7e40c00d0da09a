"""What a run shows besides metrics.jsonl: tqdm progress that stays line-based in a log file (real subprocesses
writing to a real file, and to a pseudo-terminal), TensorBoard event files read back with tensorboard's own reader,
a one-line error for a tracker that is not installed, and the model card of every exported dir."""
import math
import os
import fcntl
import pty
import struct
import subprocess
import sys
import termios

import pytest

from nanoalign.train import rate
from tests.fixtures import ROOT, cached_toy_setup, read_metrics, run_script

FP32 = ("--device", "cpu", "--precision", "fp32", "--save-every", 0)
BAR = ("from nanoalign.train import Progress, rate\n"
       "p = Progress(40, 'sft', enabled={enabled})\n"
       "for i in range(40):\n"
       "    p.update(1, rate(12.5, 1.0, 'tok'), loss=1.0 / (i + 1))\n"
       "p.close()\n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return cached_toy_setup(tmp_path_factory)


def test_rate_units_fit_small_and_large_speeds():
    assert rate(12.5, 1.0, "tok") == "12.5 tok/s"       # the old bar printed `0.0k` for anything under 50
    assert rate(0.42, 1.0, "tok") == "0.42 tok/s"
    assert rate(45_100, 1.0, "tok") == "45.1k tok/s"
    assert rate(3, 2.0, "prompts") == "1.50 prompts/s"


def test_progress_in_a_log_file_is_line_based(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", BAR.format(enabled=True)], cwd=ROOT, stderr=f, check=True, timeout=60)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 20  # every 5% of 40 steps, the last one included, nothing else
    assert lines[0].startswith("sft:   5% 2/40 [") and lines[0].endswith(", loss=0.5, 12.5 tok/s]")
    assert lines[-1].startswith("sft: 100% 40/40 [") and lines[-1].endswith(", loss=0.025, 12.5 tok/s]")


def test_progress_on_a_terminal_is_a_tqdm_bar_and_other_ranks_are_silent(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr is a pseudo-terminal, as in an interactive shell
        os.chdir(ROOT)
        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column window
        os.execv(sys.executable, [sys.executable, "-c", BAR.format(enabled=True)])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "\r" in text and "40/40" in text and "█" in text  # redrawn in place, with a bar
    silent = subprocess.run([sys.executable, "-c", BAR.format(enabled=False)], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=60)
    assert silent.stderr == "" and silent.stdout == ""


def test_sft_reports_to_tensorboard_and_writes_its_model_card(toy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, log = tmp_path / "sft", tmp_path / "sft.log"
    args = ["--model", toy.model, "--data", toy.sft, "--out", out, *FP32, "--max-steps", 4, "--batch-size", 4,
            "--max-len", 128, "--lr", 3e-4, "--warmup-steps", 1, "--eval-every", 2, "--report-to", "tensorboard"]
    with open(log, "w") as f:  # the log file a user would redirect to: no carriage returns, lines per step
        subprocess.run([sys.executable, "train_sft.py", *map(str, args)], cwd=ROOT, stdout=f, stderr=f, check=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert "\r" not in text
    assert [line.split(" [")[0] for line in text.splitlines() if line.startswith("sft:")] == [
        "sft:  25% 1/4", "sft:  50% 2/4", "sft:  75% 3/4", "sft: 100% 4/4"]
    rows = read_metrics(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [(e.step, pytest.approx(e.value, rel=1e-5, abs=1e-6)) for e in events.Scalars(key)] == [
            (r["step"], r[key]) for r in rows]
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
    assert "lr: 0.0003" in events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    card = (out / "final/README.md").read_text()
    assert card.startswith(f"---\nbase_model: {toy.model}\nlibrary_name: transformers\n")
    for line in (f"| `{toy.sft}` | 63 |", "| `(held out for eval loss)` | 1 |", "| lr | `0.0003` |",
                 "| warmup_steps | `1` |", "| max_len | `128` |", "| steps | `4` |", "| global_batch | `4` |",
                 f"| loss | {rows[-1]['loss']:.4g} |", f"| eval_loss | {rows[-1]['eval_loss']:.4g} |",
                 "python train_sft.py " + " ".join(map(str, args))):
        assert line in card.splitlines(), line
    assert "lora_r" not in card.split("## Final")[0]  # full fine-tune: no LoRA settings in the table


def test_dpo_paper_settings_and_cards_of_final_and_merged(toy, tmp_path):
    """--beta-warmup-steps, --margin-clamp and --schedule step, as the run applies them, and both model cards."""
    out = tmp_path / "dpo"
    run_script("train_dpo.py", "--model", toy.model, "--data", toy.prefs, "--data", toy.prefs, "--data-weights",
               "1,0.5", "--out", out, *FP32, "--max-steps", 5, "--batch-size", 4, "--lr", 1e-3, "--beta", 0.2,
               "--beta-warmup-steps", 4, "--margin-clamp", 20, "--schedule", "step", "--lr-step-every", 0.2,
               "--eval-frac", 0.05, "--merge")
    rows = read_metrics(out)
    # beta ramps 0.2/4 = 0.05, 0.1, 0.15, 0.2, then stays; 30 + 15 training pairs (below), 11 steps an epoch,
    # so the lr halves every round(0.2 * 11) = 2 steps
    assert [r["beta"] for r in rows] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name, library in (("final", "peft"), ("merged", "transformers")):
        card = (out / name / "README.md").read_text().splitlines()
        assert f"library_name: {library}" in card
        # both sources hold out the same 2 pairs (same file, same seed): 30 + 0.5 x 30 train, 4 held out
        for line in (f"| `{toy.prefs}` | 32 |", f"| `{toy.prefs} (weight 0.5)` | 32 |",
                     "| `(mixed training pairs)` | 45 |", "| `(held out for eval)` | 4 |",
                     "| beta | `0.2` |", "| beta_warmup_steps | `4` |", "| margin_clamp | `20` |",
                     "| schedule | `step` |", "| lora_r | `8` |", "| steps | `5` |"):
            assert line in card, (name, line)


def test_report_to_a_missing_backend_is_one_line_before_any_work(toy, tmp_path):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    for script in ("train_sft.py", "train_dpo.py"):
        proc = run_script(script, "--model", toy.model, "--data", tmp_path / "not-read.jsonl", "--out", tmp_path / "o",
                          "--report-to", "wandb", check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            "error: --report-to wandb: the `wandb` package is not installed (pip install wandb)"]
        assert not (tmp_path / "o").exists()


def test_tensorboard_hyperparameters_are_the_run_arguments(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nanoalign.report import open_tracker
    tracker = open_tracker("tensorboard", tmp_path, {"lr": 1e-5, "data": ["a", "b"], "lora": True})
    tracker.log(1, {"step": 1, "loss": 0.5, "note": "text is skipped"})
    tracker.close({"loss": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("final/loss")] == [(0, 0.5)]
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 1e-5 and hparams["data"].string_value == "['a', 'b']"
    assert hparams["lora"].number_value == 1  # torch writes a bool as a number
