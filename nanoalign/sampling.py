"""Choosing the next token: temperature, top-k, top-p, vocab limit, and counter-based random numbers that make
sample k of prompt p depend only on (seed, p, k). The generation loop around it is nanoalign/engine.py.

    tok = sample_next(logits, temperature=0.8, top_p=0.95, vocab_limit=151665, streams=(keys, counters))
"""
import hashlib

import torch

from nanoalign.errors import InputError
from nanoalign.train import nonneg_float, nonneg_int, positive_int, probability


def add_sampling_args(parser, temperature, top_p):
    """The sampling flags gen_synthetic.py and eval_winrate.py share, with each script's defaults (synthetic samples
    want variety, an evaluation greedy answers); the local engine and a completions server get the same settings."""
    parser.add_argument("--temperature", type=nonneg_float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=probability, default=top_p)
    parser.add_argument("--top-k", type=nonneg_int, default=0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)


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


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, vocab_limit=None, streams=None):
    """Next token ids from last-position logits, with no host sync (a CUDA graph can hold it).

    Args:
        logits: [b, V]; any float dtype (sampled in fp32).
        temperature: 0 = greedy argmax (top_k/top_p then do not matter).
        generator: torch.Generator on logits' device, for reproducible draws.
        vocab_limit: ids >= vocab_limit are never chosen: Qwen's embedding has 151,936 rows, its tokenizer
            151,665 tokens, and the untrained rows must not be sampled (PITFALLS #6).
        streams: (keys [b, 2], counters [b]) long: draw row r's uniform from stream_uniform instead of the
            generator, so a row's token depends on its own key and counter, never on the batch it sits in.
    Returns:
        [b] long.
    """
    logits = logits[:, :vocab_limit].float()  # slicing keeps ids as they are: the unused ids sit at the end
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_k_top_p_filter(logits / temperature, top_k, top_p).softmax(dim=-1)
    if streams is not None:
        u = stream_uniform(*streams)
    else:
        u = torch.rand(probs.shape[0], device=probs.device, generator=generator)
    # inverse CDF: the first id whose cumulative mass reaches u. A filtered id adds 0 to the sum, so it can never
    # be that first id; one uniform per row (torch.multinomial would check the probabilities with a .item() sync)
    cdf = probs.cumsum(dim=-1)  # [b, V]
    target = u.clamp(2 ** -25, 1 - 2 ** -24)[:, None] * cdf[:, -1:]  # [b, 1], strictly inside (0, total)
    return (cdf < target).sum(dim=-1)


# -----------------------------------------------------------------------------
# Counter-based random numbers: sample k of prompt p depends on (seed, p, k) and its token index only

M31 = 2 ** 31 - 1


def hash31(x):
    """A bijective hash of 31-bit integers held in int64; every product stays below 2^62, so the result is the same
    on every device (no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M31
    x = ((x >> 16) ^ x) * 0x45D9F3B & M31
    return (x >> 16) ^ x


def stream_key(seed, key) -> tuple[int, int]:
    """Two 31-bit words naming the random stream of one request, from the run's seed and the request's key
    (e.g. (prompt_id, sample index)): a stable hash, the same in every process and Python version."""
    digest = hashlib.blake2b(repr((seed, key)).encode(), digest_size=8).digest()
    word = int.from_bytes(digest, "little")
    return word & M31, (word >> 31) & M31


def stream_uniform(keys, counters):
    """One uniform in (0, 1) per row: a fixed function of the row's key [b, 2] and counter [b] (its token index)."""
    bits = hash31(hash31(hash31(keys[:, 0] ^ (counters & M31)) ^ keys[:, 1]))
    return ((bits >> 7).float() + 0.5) * 2 ** -24  # 24 bits: all an fp32 holds
