"""python -m nanoalign.plot draws any runs' metrics.jsonl (and win-rate summaries) as real PNGs, read back with
matplotlib's own PNG reader; without matplotlib it says how to get it, and the demo goes on without figures."""
import json
import subprocess
import sys

import pytest

from tests.fixtures import ROOT, write_jsonl

plt = pytest.importorskip("matplotlib.pyplot")  # the `test` extra installs it


def fake_runs(tmp_path):
    sft = write_jsonl(tmp_path / "sft/metrics.jsonl", [dict(step=s, loss=3 - 0.1 * s, **({"eval_loss": 3.1 - 0.1 * s}
                                                       if s % 5 == 0 else {})) for s in range(1, 21)])
    dpo = write_jsonl(tmp_path / "dpo/metrics.jsonl", [dict(step=s, loss=0.69 - 0.01 * s, reward_acc=0.5 + 0.02 * s,
                                                       reward_margin=0.1 * s, chosen_logps=-20.0 - s,
                                                       rejected_logps=-20.0 - 2 * s) for s in range(1, 21)])
    return sft.parent, dpo.parent


def test_plot_command_writes_png_of_the_runs(tmp_path):
    sft, dpo = fake_runs(tmp_path)
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "summary.json").write_text(json.dumps(dict(name_a="dpo", name_b="sft", win_rate=0.63, ci95=[0.56, 0.69],
                                                        wins=140, losses=82, ties=78)))
    proc = subprocess.run([sys.executable, "-m", "nanoalign.plot", str(sft), str(dpo), "--out", str(tmp_path / "c.png"),
                           "--winrates", str(evals), "--winrates-out", str(tmp_path / "w.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    curves, winrates = plt.imread(tmp_path / "c.png"), plt.imread(tmp_path / "w.png")
    # five panels (SFT loss, DPO loss, accuracy, margin, log-probs) in 3 columns x 2 rows of 5 x 3.4 in at 100 dpi
    assert curves.shape == (680, 1500, 4)
    assert winrates.shape[:2] == (200, 700)  # one comparison
    # drawn in colour: tab10's first two colours (the two runs) are on the page, not just black and white
    blue, orange = (0.12, 0.47, 0.71), (1.0, 0.50, 0.05)
    for colour in (blue, orange):
        assert (abs(curves[..., :3] - colour).max(-1) < 0.02).sum() > 200


def test_only_the_panels_a_run_has(tmp_path):
    from nanoalign.plot import plot_runs
    sft, _ = fake_runs(tmp_path)
    assert plt.imread(plot_runs([sft], tmp_path / "sft.png")).shape == (340, 500, 4)  # SFT loss alone


def test_missing_metrics_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanoalign.plot", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope' / 'metrics.jsonl'}: no metrics.jsonl (is {tmp_path / 'nope'} a training run's --out?)"]


def test_without_matplotlib_the_demo_says_how_and_goes_on(tmp_path):
    sft, dpo = fake_runs(tmp_path)
    (tmp_path / "dpo2").symlink_to(dpo)
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # what `import matplotlib` does when it is not installed
            "from pathlib import Path; from nanoalign.demo import write_figures\n"
            f"print(repr(write_figures(Path({str(tmp_path)!r}), {{}})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"no figures: matplotlib is not installed: pip install 'nanoalign[plot]' (or pip install matplotlib); "
        f"then: python -m nanoalign.plot {tmp_path}/sft {tmp_path}/dpo {tmp_path}/dpo2", "''"]
    assert not (tmp_path / "curves.png").exists()
