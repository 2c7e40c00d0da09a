import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from torch.utils._python_dispatch import TorchDispatchMode

from nanoalign.losses import (dpo_loss, dpo_metrics, masked_logps, response_lengths, sequence_logps, sft_loss,
                              token_logp_sum, token_logps)


def reference_logps(hidden, weight, targets):
    """Unchunked plain-autograd log_softmax(hidden @ weight.T).gather(targets)."""
    return F.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def random_inputs(n=10, d=8, V=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, targets


# ----------------------------------------------------------------------------- token_logps


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 10, 1024])  # 3 does not divide n=10, 5 does
def test_token_logps_matches_log_softmax_and_its_gradients(chunk_size):
    hidden, weight, targets = random_inputs()
    upstream = torch.randn(10, generator=torch.Generator().manual_seed(1))  # non-uniform grad_output

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = token_logps(h1, w1, targets, chunk_size=chunk_size)
    (out * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_logps(h2, w2, targets)
    (ref * upstream).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (10,)
    assert_close(out, ref)
    assert_close(h1.grad, h2.grad)
    assert_close(w1.grad, w2.grad)


def test_token_logps_gradcheck_float64():
    hidden, weight, targets = random_inputs(n=5, d=4, V=7, dtype=torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: token_logps(h, w, targets, chunk_size=2), (hidden, weight))


def test_token_logps_frozen_weight_gets_no_grad():
    hidden, weight, targets = random_inputs()
    h1 = hidden.clone().requires_grad_()
    token_logps(h1, weight, targets, chunk_size=4).sum().backward()
    h2 = hidden.clone().requires_grad_()
    reference_logps(h2, weight, targets).sum().backward()
    assert weight.grad is None
    assert_close(h1.grad, h2.grad)


def test_token_logps_bf16_autocast_close_to_fp32():
    hidden, weight, targets = random_inputs(n=12, d=16, V=50)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logps(h1, w1, targets, chunk_size=5)
    out.sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_logps(h2, w2, targets)
    ref.sum().backward()

    assert out.dtype == torch.float32
    assert h1.grad.dtype == w1.grad.dtype == torch.float32  # flows back to the fp32 master params
    # bf16 has 8 mantissa bits; logits here are O(10), so allow a few percent
    assert_close(out, ref, atol=0.15, rtol=0.02)
    assert_close(h1.grad, h2.grad, atol=0.05, rtol=0.05)
    assert_close(w1.grad, w2.grad, atol=0.05, rtol=0.05)


def test_token_logps_bf16_inputs_return_bf16_grads():
    hidden, weight, targets = random_inputs(dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = token_logps(hidden, weight, targets, chunk_size=3)
    out.sum().backward()
    assert out.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert_close(out, reference_logps(hidden.detach(), weight.detach(), targets))  # same bf16 matmul, fp32 softmax


# ----------------------------------------------------------------------------- token_logp_sum (one pass)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 1024])
def test_token_logp_sum_matches_log_softmax_and_its_gradients(chunk_size):
    hidden, weight, targets = random_inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = token_logp_sum(h1, w1, targets, chunk_size=chunk_size)
    (out * -0.37).backward()  # a scalar upstream gradient other than 1 (the loss's -1 / num_tokens)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_logps(h2, w2, targets).sum()
    (ref * -0.37).backward()
    assert out.shape == () and out.dtype == torch.float32
    assert_close(out, ref)
    assert_close(h1.grad, h2.grad)
    assert_close(w1.grad, w2.grad)


def test_token_logp_sum_gradcheck_float64_and_frozen_weight():
    hidden, weight, targets = random_inputs(n=5, d=4, V=7, dtype=torch.float64)
    hidden.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: token_logp_sum(h, w, targets, chunk_size=2),
                                    (hidden, weight.clone().requires_grad_()))
    token_logp_sum(hidden, weight, targets, chunk_size=2).backward()
    assert weight.grad is None and hidden.grad is not None


def test_sft_loss_backward_runs_no_matmul():
    """The lm_head gradients are made in forward (one pass): backward only scales them, so it runs no matmul
    (the recomputing version ran 3 per chunk: logits, grad_hidden, grad_weight)."""
    hidden, weight, input_ids, loss_mask = make_batch()
    hidden.requires_grad_()
    weight.requires_grad_()
    with CountMatmuls() as forward:
        loss = sft_loss(hidden, weight, input_ids, loss_mask, chunk_size=4)  # 12 targets: 3 chunks
    with CountMatmuls() as backward:
        loss.backward()
    assert forward.count == 9 and backward.count == 0, (forward.count, backward.count)
    with torch.no_grad(), CountMatmuls() as no_grad:  # eval: logits only
        sft_loss(hidden, weight, input_ids, loss_mask, chunk_size=4)
    assert no_grad.count == 3


@pytest.mark.parametrize("fn", [token_logps, token_logp_sum])
def test_one_chunk_buffer_at_a_time(fn):
    """The forward holds one [chunk, V] fp32 buffer: logsumexp and the softmax gradient are computed in place on
    the logits (torch.logsumexp made a second one: 0.58 GiB more at 1,024 rows of Qwen's vocabulary)."""
    from tests.fixtures import peak_rss_rise
    hidden, weight, targets = random_inputs(n=512, d=16, V=50_000)  # a [512, 50000] fp32 chunk: 97.7 MiB
    hidden.requires_grad_()
    buffer = 512 * 50_000 * 4
    rise, out = peak_rss_rise(lambda: fn(hidden, weight, targets, chunk_size=512))
    assert rise < 1.5 * buffer, rise / buffer
    assert_close(out, reference_logps(hidden.detach(), weight, targets).sum() if out.dim() == 0 else
                 reference_logps(hidden.detach(), weight, targets))


def test_token_logp_sum_bf16_autocast_close_to_fp32():
    hidden, weight, targets = random_inputs(n=12, d=16, V=50)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logp_sum(h1, w1, targets, chunk_size=5)
    out.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference_logps(h2, w2, targets).sum().backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.float32
    assert_close(h1.grad, h2.grad, atol=0.05, rtol=0.05)
    assert_close(w1.grad, w2.grad, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- masked_logps / sft_loss


def tiny_example():
    """V=4, d=2. Row 0 of the lm_head reads hidden[0], row 1 reads hidden[1], rows 2-3 are zero."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    ln3 = math.log(3)
    hidden = torch.tensor([[[0.0, 0.0],     # logits [0,0,0,0]     -> predicts token 0: log(1/4)
                            [ln3, 0.0],     # logits [ln3,0,0,0]   -> predicts token 1: log(1/6)
                            [0.0, ln3],     # next token not trained
                            [5.0, 5.0]]])   # last position predicts nothing
    input_ids = torch.tensor([[2, 0, 1, 1]])
    loss_mask = torch.tensor([[0, 1, 1, 0]])
    return hidden, weight, input_ids, loss_mask


def test_sft_loss_tiny_vocab_by_hand():
    hidden, weight, input_ids, loss_mask = tiny_example()
    logps, rows = masked_logps(hidden, weight, input_ids, loss_mask, chunk_size=1)
    assert_close(logps, torch.tensor([-1.386294, -1.791759]), atol=1e-6, rtol=0)  # -ln 4, -ln 6
    assert rows.tolist() == [0, 0]
    loss = sft_loss(hidden, weight, input_ids, loss_mask)
    assert_close(loss, torch.tensor(1.589027), atol=1e-6, rtol=0)  # (ln 4 + ln 6) / 2 = ln(24) / 2


def make_batch(b=3, t=9, d=8, V=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(V, d, generator=g)
    input_ids = torch.randint(0, V, (b, t), generator=g)
    # row 0: 3 prompt tokens, 4 trained, 2 pad; row 1: 5 prompt, 4 trained; row 2: 2 prompt, 2 trained, 1 prompt
    # (a second user turn), 2 trained, 2 pad
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0],
                              [0, 0, 0, 0, 0, 1, 1, 1, 1],
                              [0, 0, 1, 1, 0, 1, 1, 0, 0]])[:b, :t]
    return hidden, weight, input_ids, loss_mask


def test_prompt_and_pad_positions_get_exactly_zero_gradient():
    hidden, weight, input_ids, loss_mask = make_batch()
    hidden.requires_grad_()
    sft_loss(hidden, weight, input_ids, loss_mask, chunk_size=4).backward()
    predicts_trained = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts_trained[:, :-1] = loss_mask[:, 1:].bool()
    assert torch.equal(hidden.grad[~predicts_trained], torch.zeros_like(hidden.grad[~predicts_trained]))
    assert (hidden.grad[predicts_trained].abs().sum(-1) > 0).all()


def test_sequence_logps_matches_manual_gather():
    hidden, weight, input_ids, loss_mask = make_batch()
    logp = F.log_softmax(hidden @ weight.T, dim=-1)  # [b, t, V]
    expected = torch.zeros(3)
    for i in range(3):
        for j in range(1, 9):
            if loss_mask[i, j]:
                expected[i] += logp[i, j - 1, input_ids[i, j]]
    assert_close(sequence_logps(hidden, weight, input_ids, loss_mask, chunk_size=3), expected)
    with torch.no_grad():  # the reference precompute path
        assert_close(sequence_logps(hidden, weight, input_ids, loss_mask), expected)


def test_sft_loss_global_token_count_over_micro_batches():
    hidden, weight, input_ids, loss_mask = make_batch()
    hidden.requires_grad_()
    weight.requires_grad_()
    # micro-batch a = row 0 (4 tokens), micro-batch b = rows 1-2 (8 tokens): 12 in the optimizer step
    mbs = [(hidden[:1], input_ids[:1], loss_mask[:1]), (hidden[1:], input_ids[1:], loss_mask[1:])]
    n_a, n_b = 4, 8
    total = sum(sft_loss(h, weight, ids, m, num_tokens=n_a + n_b, chunk_size=5) for h, ids, m in mbs)
    total.backward()
    grad_h, grad_w = hidden.grad.clone(), weight.grad.clone()

    hidden.grad, weight.grad = None, None
    logp = F.log_softmax(hidden[:, :-1] @ weight.T, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    nll = -logp[loss_mask[:, 1:].bool()]  # [12] every trained token of the step
    assert nll.numel() == n_a + n_b
    global_mean = nll.mean()
    global_mean.backward()

    assert_close(total, global_mean)
    assert_close(grad_h, hidden.grad)
    assert_close(grad_w, weight.grad)
    # and the naive mean of per-micro-batch means is a different number
    loss_a = sft_loss(hidden[:1], weight, input_ids[:1], loss_mask[:1])
    loss_b = sft_loss(hidden[1:], weight, input_ids[1:], loss_mask[1:])
    assert_close(loss_a * n_a + loss_b * n_b, nll.sum())
    assert not torch.allclose((loss_a + loss_b) / 2, global_mean, atol=1e-3)


def test_sft_loss_rejects_empty_mask():
    hidden, weight, input_ids, loss_mask = make_batch()
    with pytest.raises(ValueError):
        sft_loss(hidden, weight, input_ids, torch.zeros_like(loss_mask))
    with pytest.raises(ValueError):
        sft_loss(hidden, weight, input_ids, loss_mask, num_tokens=0)


# ----------------------------------------------------------------------------- dpo


def example_logps():
    # policy chosen -1.0, ref chosen -2.0, policy rejected -3.0, ref rejected -2.5: logits = 1 - (-0.5) = 1.5
    return torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])


LENGTHS = dict(chosen_lengths=torch.tensor([4.0]), rejected_lengths=torch.tensor([2.0]))  # response tokens


@pytest.mark.parametrize("loss_type, label_smoothing, length_penalty, expected", [
    ("sigmoid", 0.0, 0.0, 0.620957),   # -logsigmoid(0.15) = ln(1 + e^-0.15)
    ("sigmoid", 0.1, 0.0, 0.635957),   # 0.9 ln(1 + e^-0.15) + 0.1 ln(1 + e^0.15) = 0.620957 + 0.1 * 0.15
    ("ipo", 0.0, 0.0, 20.250000),      # per-token log-ratios: 1 / 4 - (-0.5 / 2) = 0.5; (0.5 - 1 / 0.2)^2 = (-4.5)^2
    ("hinge", 0.0, 0.0, 0.850000),     # relu(1 - 0.15)
    ("sigmoid", 0.0, 0.05, 0.575939),  # R-DPO: ln(1 + e^-(0.15 + 0.05 * (4 - 2))) = ln(1 + e^-0.25)
    ("sigmoid", 0.1, 0.05, 0.600939),  # R-DPO + cDPO: 0.9 ln(1 + e^-0.25) + 0.1 ln(1 + e^0.25) = 0.575939 + 0.1 * 0.25
])
def test_dpo_loss_by_hand(loss_type, label_smoothing, length_penalty, expected):
    losses, chosen, rejected = dpo_loss(*example_logps(), beta=0.1, loss_type=loss_type,
                                        label_smoothing=label_smoothing, length_penalty=length_penalty, **LENGTHS)
    assert_close(losses, torch.tensor([expected]), atol=1e-6, rtol=0)
    # the rewards are the summed log-ratios times beta, whatever the loss (TRL logs the same for ipo)
    assert_close(chosen, torch.tensor([0.100000]), atol=1e-6, rtol=0)     # 0.1 * (-1 - -2)
    assert_close(rejected, torch.tensor([-0.050000]), atol=1e-6, rtol=0)  # 0.1 * (-3 - -2.5)


def test_length_penalty_favours_the_shorter_chosen_answer():
    """R-DPO adds alpha (|y_c| - |y_r|) inside the sigmoid, unscaled by beta: a pair whose chosen answer is the
    shorter one keeps pulling harder (its loss and gradient grow), a longer chosen one pulls less."""
    pc, pr, rc, rr = example_logps()
    pc.requires_grad_()
    short = dict(chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([4.0]))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, length_penalty=0.05, **short)
    assert_close(losses, torch.tensor([0.668460]), atol=1e-6, rtol=0)  # ln(1 + e^-(0.15 - 0.1))
    losses.sum().backward()
    assert_close(pc.grad, torch.tensor([-0.1 / (1 + math.exp(0.05))]))  # -beta * sigmoid(-z), z = 0.05
    pc.grad = None
    dpo_loss(pc, pr, rc, rr, beta=0.1, length_penalty=0.05, **LENGTHS)[0].sum().backward()
    assert_close(pc.grad, torch.tensor([-0.1 / (1 + math.exp(0.25))]))  # z = 0.25: a smaller pull
    # alpha 0 is plain DPO, with or without lengths
    assert_close(dpo_loss(pc, pr, rc, rr, length_penalty=0.0, **short)[0], dpo_loss(pc, pr, rc, rr)[0])
def test_dpo_loss_is_ln2_when_policy_equals_reference():
    chosen, rejected = torch.tensor([-12.3, -4.0, -50.0]), torch.tensor([-7.1, -9.9, -50.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.5)
    assert_close(losses, torch.full((3,), 0.693147), atol=1e-6, rtol=0)  # ln 2
    assert torch.equal(chosen_rewards, torch.zeros(3)) and torch.equal(rejected_rewards, torch.zeros(3))


def test_dpo_rewards_are_detached_and_loss_differentiable():
    pc, pr, rc, rr = example_logps()
    pc.requires_grad_()
    losses, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr)
    assert losses.requires_grad and not chosen_rewards.requires_grad
    losses.sum().backward()
    assert_close(pc.grad, torch.tensor([-0.1 * torch.sigmoid(torch.tensor(-0.15)).item()]))  # -beta * sigmoid(-0.15)


def test_dpo_loss_rejects_bad_options():
    with pytest.raises(ValueError):
        dpo_loss(*example_logps(), loss_type="kto")
    with pytest.raises(ValueError, match="--label-smoothing"):
        dpo_loss(*example_logps(), loss_type="ipo", label_smoothing=0.1, **LENGTHS)
    with pytest.raises(ValueError, match="--length-penalty"):
        dpo_loss(*example_logps(), loss_type="hinge", length_penalty=0.1, **LENGTHS)
    with pytest.raises(ValueError, match="need chosen_lengths"):  # per-token log-ratios need the lengths
        dpo_loss(*example_logps(), loss_type="ipo")
    with pytest.raises(ValueError, match="need chosen_lengths"):
        dpo_loss(*example_logps(), length_penalty=0.1)


def test_response_lengths_count_what_sequence_logps_sums():
    _, _, _, loss_mask = make_batch()
    assert response_lengths(loss_mask).tolist() == [4.0, 4.0, 4.0]
    # packed: row 0 holds sequences 0 (trained 2) and 1 (trained 1); row 1 holds sequence 2 (trained 3); a
    # sequence's first token is never a target (it starts a document), so a trained token there is not counted
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 0]])
    seqs = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 3]])
    assert response_lengths(mask, seqs, 4).tolist() == [2.0, 2.0, 3.0, 0.0]


# The batch of test_dpo_losses_match_trl: 2 pairs, rows chosen 0, chosen 1, rejected 0, rejected 1, with 4, 2, 3
# and 5 response tokens; per-token log-probs -(row + 1) * (position + 1) / 8 on the shifted targets.
TRL_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
TRL_TOKEN_LOGPS = -torch.arange(1, 5.)[:, None] * torch.arange(1, 6.)[None] / 8 * TRL_MASK[:, 1:]  # [4, 5]
TRL_REF = torch.tensor([-2.0, -1.0]), torch.tensor([-3.5, -4.0])  # chosen, rejected
# TRL 1.16.0's loss on that batch (beta 0.1), DPOTrainer._compute_loss as trl_losses() below calls it
TRL_LOSSES = {"sigmoid": 0.6097805500030518, "ipo": 22.726987838745117, "hinge": 0.824999988079071}


def trl_losses(tmp_path):
    """DPOTrainer._compute_loss of the installed TRL on the batch above: a real trainer (tiny model, precomputed
    reference), the policy's per-token log-probs given by a stand-in model. -> ({loss_type: loss}, rewards)."""
    from types import SimpleNamespace

    import tokenizers
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.conftest import make_hf_model_dir

    class GivenLogps(torch.nn.Module):
        def forward(self, **kwargs):
            zeros = torch.zeros(TRL_TOKEN_LOGPS.shape)
            return SimpleNamespace(log_probs=TRL_TOKEN_LOGPS, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                   log_sum_sq_probs=None)

    model_dir = make_hf_model_dir(tmp_path / "hf")
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<pad>": 1}, unk_token="a"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="<pad>")
    inputs = dict(input_ids=torch.zeros(4, 6, dtype=torch.long), attention_mask=torch.ones(4, 6, dtype=torch.long),
                  completion_mask=TRL_MASK, ref_chosen_logps=TRL_REF[0], ref_rejected_logps=TRL_REF[1])
    losses, rewards = {}, None
    for loss_type in TRL_LOSSES:
        args = DPOConfig(output_dir=str(tmp_path / "out"), loss_type=[loss_type], beta=0.1, report_to=[],
                         precompute_ref_log_probs=True, use_cpu=True)
        trainer = DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a"}] * 2),
                             processing_class=tokenizer)
        losses[loss_type] = trainer._compute_loss(GivenLogps(), inputs, return_outputs=False).item()
        rewards = {k: trainer._metrics["eval"][f"rewards/{k}"][-1] for k in ("chosen", "rejected")}
    return losses, rewards


def test_dpo_losses_match_trl(tmp_path):
    """Our losses on TRL's batch equal TRL's: IPO on per-token log-ratios (by hand: chosen (0.25 / 4, -1.25 / 2),
    rejected (-1 / 3, -3.5 / 5), margins 0.395833 and 0.075, losses (0.395833 - 5)^2 = 21.198351 and
    (0.075 - 5)^2 = 24.255625, mean 22.726988; the summed log-ratios gave 10.8125), the rewards on summed ones."""
    lengths = response_lengths(TRL_MASK)
    assert lengths.tolist() == [4.0, 2.0, 3.0, 5.0]
    logps = TRL_TOKEN_LOGPS.sum(1)  # [-1.75, -2.25, -4.5, -7.5]
    ours = {}
    for loss_type in TRL_LOSSES:
        losses, chosen, rejected = dpo_loss(logps[:2], logps[2:], *TRL_REF, beta=0.1, loss_type=loss_type,
                                            chosen_lengths=lengths[:2], rejected_lengths=lengths[2:])
        ours[loss_type] = losses.mean().item()
    assert ours["ipo"] == pytest.approx(22.726988, abs=1e-5)
    assert ours == pytest.approx(TRL_LOSSES, rel=1e-6)
    assert chosen.mean().item() == pytest.approx(-0.05) and rejected.mean().item() == pytest.approx(-0.225)


def test_trl_figures_are_trls_own(tmp_path):
    """TRL_LOSSES recomputed by the installed TRL (CI installs no trl: this one is skipped there, the figures above
    still checked), and TRL's logged rewards: beta times the summed log-ratios, for ipo too."""
    trl = pytest.importorskip("trl")
    live, rewards = trl_losses(tmp_path)
    assert live == pytest.approx(TRL_LOSSES, rel=1e-6), trl.__version__
    assert rewards == pytest.approx({"chosen": -0.05, "rejected": -0.225}, rel=1e-6)


def test_dpo_metrics():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -3.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)  # rewards: chosen [0.1, 0], rejected [-0.05, 0.1]
    m = dpo_metrics(losses, chosen, rejected, pc, pr)
    assert_close(m["reward_acc"], torch.tensor(0.5))
    assert_close(m["reward_margin"], torch.tensor(0.025))  # ((0.1 + 0.05) + (0 - 0.1)) / 2
    assert_close(m["chosen_reward"], torch.tensor(0.05))
    assert_close(m["rejected_reward"], torch.tensor(0.025))
    assert_close(m["chosen_logps"], torch.tensor(-2.5))
    assert_close(m["rejected_logps"], torch.tensor(-2.5))
    assert_close(m["loss"], losses.mean())
