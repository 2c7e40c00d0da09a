"""KV-cached batched sampling: temperature, top-k, top-p, per-row stop ids, left-padded prompts of any lengths.

    outs = generate(model, [chat.render_prompt(c) for c in convs], max_new_tokens=256, stop_ids=chat.stop_ids,
                    pad_id=chat.pad_id, temperature=0.7, top_p=0.9, seed=0, vocab_limit=chat.vocab_size)
    texts = generate_texts(model, chat, convs, max_new_tokens=256, n=4, temperature=1.0, seed=0)

Each output holds the NEW tokens only, without padding, and ends with the stop token when the row stopped: a row
without one was cut by max_new_tokens (a truncated completion).
"""
import torch

from nanoalign.errors import InputError
from nanoalign.model import KVCache

# -----------------------------------------------------------------------------
# One sampling step


def top_k_top_p_filter(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits, then the smallest prefix of the (renormalised) sorted distribution whose mass
    reaches top_p, including the token that crosses it (PITFALLS #6); the rest become -inf. Order as in HF's
    warpers: temperature (by the caller), top-k, top-p.

    Args:
        logits: [b, V] float.
        top_k: 0 = off. top_p: 1.0 = off, else in (0, 1).
    Returns:
        [b, V] logits, unchanged on the kept set and -inf elsewhere (the input itself when both are off).
    """
    if not (top_k >= 0 and 0.0 < top_p <= 1.0):
        raise InputError(f"need --top-k >= 0 and 0 < --top-p <= 1, got {top_k} / {top_p}")
    if top_k == 0 and top_p >= 1.0:
        return logits
    if top_k > 0:
        vals, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # [b, k], sorted descending
    else:
        vals, idx = logits.sort(dim=-1, descending=True)  # [b, V]
    if top_p < 1.0:
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass ranked above each token; 0 for the first, so one always stays
        vals = vals.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, vocab_limit=None):
    """Next token ids from last-position logits.

    Args:
        logits: [b, V]; any float dtype (sampled in fp32).
        temperature: 0 = greedy argmax (top_k/top_p then do not matter).
        generator: torch.Generator on logits' device, for reproducible draws.
        vocab_limit: ids >= vocab_limit are never chosen: Qwen's embedding has 151,936 rows, its tokenizer
            151,665 tokens, and the untrained rows must not be sampled (PITFALLS #6).
    Returns:
        [b] long.
    """
    logits = logits[:, :vocab_limit].float()  # slicing keeps ids as they are: the unused ids sit at the end
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_k_top_p_filter(logits / temperature, top_k, top_p).softmax(dim=-1)
    # torch.multinomial(probs, 1) draws exactly this way (argmax of probs / Exp(1) noise), but first checks
    # the probabilities with a .item() that syncs the GPU on every token
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


# -----------------------------------------------------------------------------
# Batched generation with a static KV cache


def _left_pad(prompts, pad_id, device):
    """[b, t] ids and attention mask (1 = real token), prompts right-aligned so every row ends at the last slot."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, t - len(p):] = 1
    return ids.to(device), mask.to(device)


def _last_logits(model, ids, mask, cache):
    hidden = model(ids, attention_mask=mask, kv_cache=cache, return_hidden=True)  # [b, t, d]
    return model.lm_head(hidden[:, -1])  # [b, V]: never the full [b, t, V] (151,936 columns) of a long prefill


def _generate_batch(model, prompts, max_new_tokens, stop, pad_id, generator, sample_kw):
    param = next(model.parameters())
    ids, mask = _left_pad(prompts, pad_id, param.device)
    b, t = ids.shape
    cache = KVCache(model.config, b, t + max_new_tokens, param.dtype, param.device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=param.device)
    done = torch.zeros(b, dtype=torch.bool, device=param.device)
    live = torch.ones((b, 1), dtype=torch.long, device=param.device)
    logits = _last_logits(model, ids, mask, cache)  # prefill; positions = cumsum(mask) - 1
    for step in range(max_new_tokens):
        tok = sample_next(logits, generator=generator, **sample_kw)  # [b]
        tok = torch.where(done, pad_id, tok)  # finished rows feed pad; their outputs are cut below
        out[:, step] = tok
        done |= torch.isin(tok, stop)
        if step + 1 == max_new_tokens or bool(done.all()):  # the one GPU sync per token
            break
        logits = _last_logits(model, tok[:, None], live, cache)  # [b, 1]: positions continue from cache.seen
    stop_set = set(stop.tolist())
    results = []
    for row in out[:, :step + 1].tolist():
        end = next((i + 1 for i, x in enumerate(row) if x in stop_set), len(row))
        results.append(row[:end])
    return results


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_k=0, top_p=1.0, seed=None,
             vocab_limit=None, batch_size=None):
    """Sample continuations of token-id prompts of different lengths, batched, with a KV cache.

    Each batch is left-padded to its longest prompt, prefilled in one forward, then decoded one token per step;
    a row is done at its first stop id (pass both <|im_end|> and <|endoftext|> for Qwen, PITFALLS #2), and the
    loop ends when all rows are done or after max_new_tokens.

    Args:
        model: CausalLM (LoRA-wrapped layers fine); runs in its dtype and device, under inference_mode.
        prompts: list of non-empty lists of token ids.
        stop_ids: iterable of ids that end a row (may be empty).
        pad_id: id fed for left padding and for finished rows (never attended to as padding, never returned).
        temperature, top_k, top_p, vocab_limit: see sample_next (temperature 0 = greedy).
        seed: seeds one torch.Generator on the model's device; same seed, prompts and batch_size -> same output.
        batch_size: prompts per forward (None = all at once); prompts are sorted by length into batches to cut
            padding, and results come back in the original order.
    Returns:
        One list per prompt of the NEW token ids: no padding, ending with the stop id if the row stopped; a row
        without a stop id was cut at max_new_tokens.
    """
    assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=device)
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if batch_size else list(range(len(prompts)))
    batch_size = batch_size or len(prompts)
    results = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = _generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, stop, pad_id, generator, sample_kw)
        for i, o in zip(chunk, outs):
            results[i] = o
    return results


def generate_texts(model, chat, conversations, max_new_tokens, n=1, **kw):
    """n sampled replies per conversation, decoded without special tokens (so truncation is no longer visible:
    use generate for that). chat is a nanoalign.chat.Chat; its stop ids, pad id and vocab size are the defaults.

    Returns:
        [len(conversations)][n] strings.
    """
    kw = dict(stop_ids=chat.stop_ids, pad_id=chat.pad_id, vocab_limit=chat.vocab_size) | kw
    prompts = [chat.render_prompt(c) for c in conversations for _ in range(n)]
    texts = [chat.decode(o) for o in generate(model, prompts, max_new_tokens, **kw)]
    return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]
