"""nanoalign.train helpers at unit level: the default precision by device, the AdamW kernel choice, what decides a
bad step (non-finite loss or gradient; fp16 overflows are the GradScaler's usual skip), the guard that stops a
diverged run, and metrics.jsonl staying valid JSON."""
import copy
import json
import math

import pytest
import torch

from nanoalign.train import (DivergenceGuard, MetricsLog, NonFiniteError, check_finite_weights, choose_precision,
                             default_precision, make_optimizer, make_scaler, optimizer_step)


def test_default_precision_by_device(monkeypatch, capsys):
    """bf16 only on a CUDA GPU that supports it; fp32 on a CPU or an older GPU. An explicit choice is kept."""
    assert default_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_precision(torch.device("cuda:0")) == "bf16"
    assert default_precision(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert default_precision(torch.device("cuda")) == "fp32"

    assert choose_precision(None, torch.device("cpu")) == "fp32"
    assert "precision: fp32 (the default on cpu" in capsys.readouterr().out
    assert choose_precision("bf16", torch.device("cpu")) == "bf16"  # the user's word wins, silently
    assert capsys.readouterr().out == ""


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def test_fused_adamw_on_cpu_matches_the_plain_loop():
    """make_optimizer picks torch's fused AdamW for CPU params (its kernel runs there too), and three steps of it
    give the weights the reference for-loop AdamW gives, decay groups included."""
    model = _model()
    reference = copy.deepcopy(model)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    x = torch.randn(8, 16)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), _model().parameters()))
    assert moved > 1e-3  # the steps did something (lr 1e-2: about 3e-2)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_foreach_when_fused_has_no_kernel(monkeypatch):
    """A device torch has no fused kernel for gets the multi-tensor (foreach) AdamW instead."""
    import nanoalign.train as train
    monkeypatch.setattr(train, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    opt = make_optimizer(_model(), lr=1e-3, weight_decay=0.0)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_adamw_on_cpu_low_precision_params(dtype):
    """Fused AdamW accepts bf16/fp16 params on a CPU too (LoRA adapters are fp32, but a user may hold any)."""
    model = _model().to(dtype)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 16, dtype=dtype)).float().square().mean().backward()
    opt.step()
    assert all((p != b).any() for p, b in zip(model.parameters(), before))


def setup(precision):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, make_optimizer(model, lr=0.1, weight_decay=0.0), make_scaler(torch.device("cpu"), precision)


def backward(model, scaler, grad_value=None):
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    if grad_value is not None:
        model.weight.grad[0, 0] = grad_value


def test_good_step_updates():
    model, opt, scaler = setup("fp32")
    before = model.weight.detach().clone()
    backward(model, scaler)
    grad_norm, bad = optimizer_step(model, opt, scaler, clip=1.0, loss=1.0)
    assert not bad and grad_norm == pytest.approx(math.sqrt(2 * 3 + 2))  # d(sum)/dW = 1, d/db = 1
    assert (model.weight != before).all()


@pytest.mark.parametrize("loss,grad", [(float("nan"), None), (float("inf"), None), (1.0, float("nan")),
                                       (1.0, float("inf"))])
def test_non_finite_loss_or_grad_is_a_skipped_bad_step(loss, grad):
    model, opt, scaler = setup("fp32")
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, scaler, grad)
    _, bad = optimizer_step(model, opt, scaler, clip=1.0, loss=loss)
    assert bad
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no update reached the weights
    assert all(p.grad is None for p in model.parameters())  # and the next step starts clean


def test_fp16_overflow_is_the_scalers_usual_skip():
    """Under fp16 an inf gradient with a finite loss is skipped by the GradScaler, which halves its scale: not a bad
    step. A non-finite loss still is."""
    model, opt, scaler = setup("fp16")
    before, scale = model.weight.detach().clone(), scaler.get_scale()
    backward(model, scaler, float("inf"))
    grad_norm, bad = optimizer_step(model, opt, scaler, clip=1.0, loss=1.0)
    assert not bad and math.isinf(grad_norm)
    assert torch.equal(model.weight, before) and scaler.get_scale() == scale / 2
    backward(model, scaler)
    assert optimizer_step(model, opt, scaler, clip=1.0, loss=float("nan"))[1]
    assert torch.equal(model.weight, before)


def test_guard_stops_after_consecutive_bad_steps():
    guard = DivergenceGuard(3)
    for step, bad in enumerate([True, True, False, True, True], start=1):  # a good step resets the count
        guard.update(step, bad, float("nan"), float("nan"))
    with pytest.raises(NonFiniteError, match=r"^step 6: non-finite loss \(nan\) or gradient norm \(inf\) for 3 steps "
                                             r"in a row \(--max-bad-steps 3\)"):
        guard.update(6, True, float("nan"), float("inf"))
    never = DivergenceGuard(0)
    for step in range(10):
        never.update(step, True, float("nan"), float("nan"))


def test_non_finite_weights_are_never_saved():
    model, _, _ = setup("fp32")
    check_finite_weights(model, 5)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^step 5: non-finite weights \(bias\): not saved"):
        check_finite_weights(model, 5)


def test_metrics_stay_valid_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1 / 3, skipped=True)

    def no_constants(token):
        raise AssertionError(token)
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=no_constants) == dict(
        step=1, loss=None, grad_norm=None, lr=0.333333333, skipped=True)


def test_metrics_keep_significant_digits_and_agree_with_tensorboard(tmp_path):
    """Small values keep their significant digits (rounding to 6 decimal places logged recipe A's StepLR lrs, a late
    cosine lr and a tiny gradient norm as 0.0), so metrics.jsonl, the plots drawn from it and TensorBoard (float32
    scalars) show the same numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nanoalign.plot import read_metrics
    from nanoalign.report import open_tracker
    from nanoalign.train import lr_at
    step_lrs = [lr_at(s, 30, 5e-7, schedule="step", step_every=10) for s in (0, 10, 20)]
    assert step_lrs == [5e-7, 2.5e-7, 1.25e-7]
    late_cosine = lr_at(999, 1000, 5e-6)  # 5e-6 * (1 + cos(0.999 pi)) / 2
    assert late_cosine == pytest.approx(1.2337e-11, rel=1e-4)
    rows = [dict(step=1, lr=step_lrs[0], grad_norm=3.2e-7, loss=0.6931471805599453),
            dict(step=2, lr=step_lrs[1], grad_norm=123456.789012, loss=float("-inf")),
            dict(step=3, lr=step_lrs[2], grad_norm=1 / 3, loss=float("nan")),
            dict(step=4, lr=late_cosine, grad_norm=0.0, loss=2.0)]
    log = MetricsLog(tmp_path / "metrics.jsonl")
    tracker = open_tracker("tensorboard", tmp_path, {})
    for row in rows:
        log.log(**row)
        tracker.log(row["step"], row)
    tracker.close()

    logged = read_metrics(tmp_path)
    assert [r["lr"] for r in logged] == [5e-7, 2.5e-7, 1.25e-7, float(f"{late_cosine:.9g}")]
    assert [r["grad_norm"] for r in logged] == [3.2e-7, 123456.789, 0.333333333, 0.0]
    assert [r["loss"] for r in logged] == [0.693147181, None, None, 2.0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("lr", "grad_norm", "loss"):
        board = {e.step: e.value for e in events.Scalars(key)}
        for r in logged:
            if r[key] is not None:  # TensorBoard keeps float32: the same number once rounded to float32
                assert torch.tensor(r[key], dtype=torch.float32).item() == board[r["step"]], (key, r, board)


def test_metrics_rows_without_a_step_are_damaged_rows(tmp_path, capsys):
    """A resume drops metrics.jsonl's rows past its step; a row whose step is missing or not an integer (a hand
    edit, another tool's row) is a damaged row, named and dropped, not a TypeError traceback (it was)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": "2", "loss": 0.4}\n{"loss": 0.3}\n{"step": 3, "loss": 0.2}\n')
    MetricsLog(path, start_step=2)
    assert capsys.readouterr().out == f"{path}:2: field 'step' holds a str: dropped 2 damaged rows (lines 2, 3)\n"
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'


def test_torch_floor_matches_what_the_code_calls(monkeypatch):
    """pyproject.toml's torch floor is the core path's need (SDPA's enable_gqa came in 2.5; it said 2.4); a flag that
    calls something newer names itself and the version it needs in one line on an older torch."""
    import re
    from pathlib import Path

    from nanoalign import train
    from nanoalign.errors import InputError
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"torch>=([\d.]+)"', pyproject).group(1) == train.TORCH_FLOOR == "2.5"
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(InputError, match=r"^--fsdp needs torch >= 2\.6 \(installed: 2\.5\.1\+cpu\)$"):
        train.require_torch("--fsdp")
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    train.require_torch("--fsdp")
    train.require_torch("--pack-attn varlen")
