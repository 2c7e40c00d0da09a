"""nanoalign.train: what decides a bad step (non-finite loss or gradient; fp16 overflows are the GradScaler's usual
skip), the guard that stops a diverged run, and metrics.jsonl staying valid JSON."""
import json
import math

import pytest
import torch

from nanoalign.train import (DivergenceGuard, MetricsLog, NonFiniteError, check_finite_weights, make_optimizer,
                             make_scaler, optimizer_step)


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
        step=1, loss=None, grad_norm=None, lr=0.333333, skipped=True)
