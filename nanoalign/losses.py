"""
Losses for SFT and DPO, computed from the model's final hidden states.

Everything goes through one log-prob function (the `_get_batch_logps` idea of the original DPO code):

    token_logps     log p(target | hidden) for n rows, chunked so the [n, V] logits never exist at once
    token_logp_sum  their sum, with its gradients made in the same pass over the lm_head (SFT)
    masked_logps    next-token shift + loss mask -> log-probs of the trained tokens only
    sft_loss        -sum(logp) / num_tokens                      (SFT)
    sequence_logps  per-sequence sum of response log-probs       (DPO policy/reference, reward checks)
    response_lengths  per-sequence count of those response tokens  (IPO's per-token log-ratios, R-DPO's penalty)
    dpo_loss        sigmoid (DPO, cDPO, R-DPO), ipo or hinge loss on those sums
    dpo_metrics     what to log so a falling chosen log-prob is noticed (PITFALLS #8)

The model is called with return_hidden=True and the lm_head weight is passed in here: with Qwen's 151,936-row
vocabulary, full logits for a [b, t] batch would be b * t * 151,936 floats, most of them for prompt and pad
tokens that are never trained. We select the trained positions first and project only those, in chunks.
"""

import torch
import torch.nn.functional as F

from nanoalign.errors import InputError


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[i, targets[i]] without keeping any [chunk, V] logits alive.

    forward keeps only the per-row logsumexp; backward recomputes each chunk's logits from it. Each pass holds one
    [chunk, V] buffer: logsumexp and the gradient are computed in place on the logits.
    Matmuls run in the input dtype, softmax and logsumexp in fp32 (fp64 for fp64 inputs, so gradcheck works).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # inputs were cast by token_logps already
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = (hidden[s:e] @ weight.T).to(acc)  # [c, V]
                target_logits = logits.gather(1, targets[s:e, None]).squeeze(1)
                lse[s:e] = _logsumexp_(logits).squeeze(1)  # logits overwritten
                logps[s:e] = target_logits - lse[s:e]
                del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, chunk_size = hidden.shape[0], ctx.chunk_size
        g = grad_logps.to(lse.dtype)  # [n]
        # every row of grad_hidden is written once, so it can live in the input dtype; grad_weight sums over chunks
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None  # frozen lm_head: skip
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h, gs = hidden[s:e], g[s:e, None]
                logits = (h @ weight.T).to(lse.dtype)  # [c, V], recomputed
                # grad_logits = g * (onehot(target) - softmax), built in place on the logits buffer
                grad_logits = logits.sub_(lse[s:e, None]).exp_().mul_(-gs)
                grad_logits.scatter_add_(1, targets[s:e, None], gs)
                _backprop_chunk(grad_logits, h, weight, grad_hidden, grad_weight, s, e)
                del logits, grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _logsumexp_(logits):
    """logsumexp over the last dim, [c, V] -> [c, 1], overwriting logits with exp(logits - rowmax): torch.logsumexp
    would allocate a second [c, V] buffer (0.6 GB at 1,024 rows of Qwen's vocabulary in fp32)."""
    rowmax = logits.amax(-1, keepdim=True)
    return logits.sub_(rowmax).exp_().sum(-1, keepdim=True).log_().add_(rowmax)


def _backprop_chunk(grad_logits, h, weight, grad_hidden, grad_weight, s, e):
    """Rows s:e's logits gradient [c, V] into grad_hidden[s:e] and, summed over chunks, grad_weight (None: skip)."""
    grad_logits = grad_logits.to(h.dtype)
    if grad_hidden is not None:
        grad_hidden[s:e] = grad_logits @ weight  # [c, d]
    if grad_weight is not None:
        grad_weight += grad_logits.T @ h  # [V, d], fp32 accumulation across chunks


class _ChunkedLogpSum(torch.autograd.Function):
    """sum_i log_softmax(hidden @ weight.T)[i, targets[i]], its gradients made in forward: one pass over the lm_head.

    The upstream gradient of a sum is one scalar, so each chunk's gradient (onehot(target) - softmax, times weight
    and times hidden) is computed while its logits are at hand, and backward only scales it: no logits recomputed.
    Costs the [n, d] grad_hidden and an fp32 [V, d] grad_weight held from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None  # frozen lm_head: skip
        with torch.autocast(hidden.device.type, enabled=False):  # inputs were cast by token_logp_sum already
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h, t = hidden[s:e], targets[s:e, None]
                logits = (h @ weight.T).to(acc)  # [c, V]
                target_logits = logits.gather(1, t)  # [c, 1]
                rowmax = logits.amax(-1, keepdim=True)  # [c, 1]
                exp = logits.sub_(rowmax).exp_()  # in place, as in _logsumexp_: one [c, V] buffer
                norm = exp.sum(-1, keepdim=True)  # [c, 1]
                total += (target_logits - rowmax - norm.log()).sum()
                # d(sum logp)/d logits = onehot(target) - softmax, built in place on the same buffer
                grad_logits = exp.div_(norm).neg_()
                grad_logits.scatter_add_(1, t, torch.ones_like(norm))
                _backprop_chunk(grad_logits, h, weight, grad_hidden, grad_weight, s, e)
                del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _lm_head_dtype(hidden, weight):
    """The matmul dtype: autocast's when it is on (as autocast would do), else the weight's (cast the small hidden)."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


def token_logps(hidden, weight, targets, chunk_size=1024):
    """Log-prob of each target token under the lm_head, computed chunk_size rows at a time.

    Under autocast both inputs are cast to the autocast dtype first (as autocast would do for the matmul), so
    gradients flow back to fp32 master weights as usual. When weight does not require grad (LoRA with a frozen,
    tied lm_head) no weight gradient is computed.

    Args:
        hidden: [n, d] final hidden states (after the final norm).
        weight: [V, d] lm_head weight.
        targets: [n] token ids.
        chunk_size: rows per chunk; peak extra memory is a few [chunk_size, V] fp32 buffers
            (0.6 GB each at 1024 rows of Qwen's 151,936 vocab).
    Returns:
        [n] float32 log-probs (float64 for float64 inputs).
    """
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], f"{hidden.shape=} {targets.shape=}"
    assert chunk_size > 0, f"{chunk_size=}"
    dtype = _lm_head_dtype(hidden, weight)
    return _ChunkedTokenLogps.apply(hidden.to(dtype), weight.to(dtype), targets, chunk_size)


def token_logp_sum(hidden, weight, targets, chunk_size=1024):
    """sum(token_logps(hidden, weight, targets)), its gradients computed in forward in the same chunked pass.

    For losses that are a scalar times this sum (SFT): half the lm_head matmuls of token_logps' forward +
    recompute-in-backward. With no gradient wanted (eval, no_grad) it is token_logps(...).sum().
    Returns: 0-dim float32 (float64 for float64 inputs).
    """
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], f"{hidden.shape=} {targets.shape=}"
    assert chunk_size > 0, f"{chunk_size=}"
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return token_logps(hidden, weight, targets, chunk_size).sum()
    dtype = _lm_head_dtype(hidden, weight)
    return _ChunkedLogpSum.apply(hidden.to(dtype), weight.to(dtype), targets, chunk_size)


def masked_logps(hidden, weight, input_ids, loss_mask, chunk_size=1024):
    """Log-probs of the trained tokens only: hidden[:, i] predicts input_ids[:, i + 1].

    loss_mask[:, i] = 1 means token i is a trained target (an assistant token), so loss_mask[:, 0] is never used.
    Prompt and pad positions are dropped before the lm_head: they cost no compute and get exactly zero gradient.

    Args:
        hidden: [b, t, d]; weight: [V, d]; input_ids: [b, t]; loss_mask: [b, t] (0/1 or bool).
    Returns:
        logps: [n] float32, n = number of trained targets; rows: [n] batch index of each.
    """
    h, targets, rows = _trained(hidden, input_ids, loss_mask)
    return token_logps(h, weight, targets, chunk_size), rows


def _trained(hidden, input_ids, loss_mask):
    """-> hidden [n, d], targets [n], rows [n] of the n trained targets (next-token shift applied)."""
    assert input_ids.shape == loss_mask.shape == hidden.shape[:2], f"{hidden.shape=} {input_ids.shape=} {loss_mask.shape=}"
    rows, cols = loss_mask[:, 1:].bool().nonzero(as_tuple=True)  # [n], [n]
    return hidden[:, :-1][rows, cols], input_ids[:, 1:][rows, cols], rows


def sft_loss(hidden, weight, input_ids, loss_mask, num_tokens=None, chunk_size=1024):
    """Sum of -log p over the trained tokens, divided by num_tokens (one pass over the lm_head: token_logp_sum).

    Under gradient accumulation and DDP pass num_tokens = the GLOBAL number of trained tokens in the whole optimizer
    step (all micro-batches, all ranks; all_reduce the counts first), and multiply the loss by world_size since DDP
    averages gradients over ranks. The step's gradient is then exactly that of the mean over every assistant token
    of the global batch, rather than a mean of per-micro-batch means that over-weights short examples (PITFALLS #7).

    Args:
        hidden, weight, input_ids, loss_mask: as in masked_logps.
        num_tokens: divisor (int or 0-dim tensor); default the number of trained tokens in this batch.
    Returns:
        scalar loss.
    Raises:
        ValueError: if loss_mask selects no token or num_tokens is not positive (an empty mask is a bug, PITFALLS #1).
    """
    h, targets, _ = _trained(hidden, input_ids, loss_mask)
    if targets.numel() == 0:
        raise ValueError("loss_mask selects no trained token (all-zero assistant mask?)")
    num_tokens = targets.numel() if num_tokens is None else num_tokens
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return -token_logp_sum(h, weight, targets, chunk_size) / num_tokens


def sequence_logps(hidden, weight, input_ids, loss_mask, chunk_size=1024, sequence_ids=None, num_sequences=None):
    """Summed log-prob of the trained (response) tokens of each sequence: [b] float32.

    The one log-prob function for the DPO policy and reference passes, reference precompute and reward checks.
    A row with no trained token gets 0. Packed rows (several sequences a row) pass sequence_ids [b, t] (the
    sequence each position belongs to) and num_sequences; the result is then [num_sequences].
    """
    logps, rows = masked_logps(hidden, weight, input_ids, loss_mask, chunk_size)
    if sequence_ids is None:
        return logps.new_zeros(input_ids.shape[0]).index_add(0, rows, logps)
    seq = sequence_ids[:, 1:][loss_mask[:, 1:].bool()]  # [n], in masked_logps' (row-major) order
    return logps.new_zeros(num_sequences).index_add(0, seq, logps)


def response_lengths(loss_mask, sequence_ids=None, num_sequences=None):
    """Trained (response) tokens of each sequence, counted as sequence_logps sums them: [b] float32, or
    [num_sequences] for packed rows (sequence_ids [b, t], as in sequence_logps)."""
    trained = loss_mask[:, 1:].bool()  # [b, t-1]: token i + 1 is a trained target
    if sequence_ids is None:
        return trained.sum(1).float()
    return torch.bincount(sequence_ids[:, 1:][trained], minlength=num_sequences).float()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, margin_clamp=0.0, chosen_lengths=None, rejected_lengths=None,
             length_penalty=0.0):
    """Preference loss on summed sequence log-probs, all [b].

    With the log-ratios r_c = policy_chosen - ref_chosen, r_r = policy_rejected - ref_rejected and the margin
    logits = r_c - r_r:
      sigmoid  DPO, Rafailov et al. 2023 (arXiv:2305.18290): -log sigmoid(beta * logits); label_smoothing > 0 is
               conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): assumes labels flipped
               w.p. ls; length_penalty alpha > 0 is R-DPO (Park et al. 2024, arXiv:2403.19159):
               -log sigmoid(beta * logits + alpha * (|y_c| - |y_r|)), lengths in response tokens, alpha not scaled
               by beta. It is DPO derived for the objective E[r - alpha |y|] - beta KL, whose implied reward is
               beta * log-ratio + alpha |y|: a longer chosen answer already explains part of the preference, so
               the log-ratios need not grow for it (the policy is pushed less towards length).
      ipo      IPO, Azar et al. 2023 (arXiv:2310.12036), eq. 17: (logits - 1 / (2 beta))^2, on per-token log-ratios
               (r_c / |y_c| - r_r / |y_r|): TRL's definition, which its code says the IPO authors confirmed is the
               one behind the paper's results. Summed log-ratios would make the loss grow with answer length.
      hinge    SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425): relu(1 - beta * logits)
    margin_clamp > 0 clamps logits (the margin, before beta; per token for ipo) to [-margin_clamp, margin_clamp]: a
    pair already that far apart stops pulling (its gradient is 0), which keeps a few easy pairs from running away.

    Args:
        chosen_lengths, rejected_lengths: [b] response tokens of each answer (response_lengths); needed by ipo and
            by length_penalty.
    Returns:
        losses [b]; chosen_rewards, rejected_rewards [b] = beta * (policy - ref) on the summed log-probs (as TRL
        logs them for every loss type), detached.
    Raises:
        ValueError: unknown loss_type, label_smoothing or length_penalty with a loss other than sigmoid, or no
            lengths where they are needed.
    """
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise InputError(f"--label-smoothing is only defined for loss_type='sigmoid', got {loss_type!r}")
    if loss_type != "sigmoid" and length_penalty != 0.0:
        raise InputError(f"--length-penalty (R-DPO) is only defined for loss_type='sigmoid', got {loss_type!r}")
    if (loss_type == "ipo" or length_penalty) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("ipo and length_penalty need chosen_lengths and rejected_lengths")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # [b], summed over the response
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        chosen_ratio = chosen_ratio / chosen_lengths.clamp(min=1)  # per response token
        rejected_ratio = rejected_ratio / rejected_lengths.clamp(min=1)
    logits = chosen_ratio - rejected_ratio
    if margin_clamp > 0:
        logits = logits.clamp(-margin_clamp, margin_clamp)
    if loss_type == "sigmoid":
        z = beta * logits
        if length_penalty:
            z = z + length_penalty * (chosen_lengths - rejected_lengths)
        losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Batch means to log for DPO, as 0-dim float tensors (stack them to all_reduce, .item() to print).

    Watch chosen_logps: DPO can widen the margin while both log-probs fall (PITFALLS #8).
    """
    return {
        "loss": losses.mean(),
        "reward_acc": (chosen_rewards > rejected_rewards).float().mean(),  # ties (e.g. step 0) count as wrong
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "chosen_logps": policy_chosen_logps.mean(),
        "rejected_logps": policy_rejected_logps.mean(),
    }
