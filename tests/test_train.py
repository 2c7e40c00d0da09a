"""nanoalign.train helpers at unit level: the default precision by device, and the AdamW kernel choice."""
import copy

import pytest
import torch

from nanoalign.train import choose_precision, default_precision, make_optimizer


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
