"""The sampler: greedy equals the uncached argmax, left padding changes nothing, stop ids, top-k/top-p kept sets
and frequencies, vocab_limit, seeds."""
import math

import pytest
import torch

from conftest import make_hf_model_dir
from nanoalign.errors import InputError
from nanoalign.model import load_model
from nanoalign.sampling import generate, generate_texts, sample_next, top_k_top_p_filter

PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7], [100, 200, 150, 12, 99, 7, 8, 9, 10, 11, 250, 3]]
PAD = 299
N_NEW = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # initializer_range 0.2: with HF's 0.02 a random tiny model just repeats its last token, which would let a
    # sampler that ignores the model pass
    return load_model(make_hf_model_dir(tmp_path_factory.mktemp("m") / "hf", initializer_range=0.2))


def reference_greedy(model, prompt, n):
    """Argmax of the full forward (no cache, no padding) re-run on the growing sequence."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def greedy(model):
    return [reference_greedy(model, p, N_NEW) for p in PROMPTS]


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_greedy_batched_left_padded_equals_uncached_argmax(model, greedy):
    assert len({tuple(g) for g in greedy}) == 3 and all(len(set(g)) > 5 for g in greedy)  # non-trivial outputs
    assert generate(model, PROMPTS, N_NEW, stop_ids=(), pad_id=PAD, temperature=0) == greedy
    assert [generate(model, [p], N_NEW, (), PAD, temperature=0)[0] for p in PROMPTS] == greedy
    # batches sorted by length ([0, 1] then [2]) and returned in the original order
    assert generate(model, PROMPTS[::-1], N_NEW, (), PAD, temperature=0, batch_size=2) == greedy[::-1]
    # top_k=1 sampling is greedy too
    assert generate(model, PROMPTS, N_NEW, (), PAD, temperature=1.0, top_k=1, seed=3) == greedy


def test_stop_ids_end_each_row_and_the_loop(model, greedy):
    stop = greedy[0][3]
    assert stop not in greedy[0][:3] and stop not in greedy[1] and stop not in greedy[2]
    outs = generate(model, PROMPTS, N_NEW, stop_ids=(stop, 298), pad_id=PAD, temperature=0)
    assert outs[0] == greedy[0][:4] and outs[0][-1] == stop  # the stop token is kept
    assert outs[1:] == greedy[1:]  # other rows continue up to max_new_tokens: no stop token, truncated
    assert [len(o) for o in outs] == [4, N_NEW, N_NEW]

    # rows that stop at steps 1, 2 and 0: three forwards (prefill + 2 decode steps), then the loop ends
    stops = {greedy[0][1], greedy[1][2], greedy[2][0]}
    expected = []
    for g in greedy:
        first = next(i for i, x in enumerate(g) if x in stops)
        expected.append(g[:first + 1])
    assert [len(e) for e in expected] == [2, 3, 1]
    calls, handle = count_forwards(model)
    try:
        assert generate(model, PROMPTS, N_NEW, stop_ids=stops, pad_id=PAD, temperature=0) == expected
    finally:
        handle.remove()
    assert len(calls) == 3

    calls, handle = count_forwards(model)
    try:
        outs = generate(model, PROMPTS, 5, stop_ids=(), pad_id=PAD, temperature=0)
    finally:
        handle.remove()
    assert outs == [g[:5] for g in greedy] and len(calls) == 5  # the 5th token needs no forward after it


# -----------------------------------------------------------------------------
# top-k / top-p on a hand-made distribution

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
IDS = [3, 0, 4, 1, 2]  # PROBS[r] sits at id IDS[r]: the kept set must map back through the sort


def hand_logits(dtype=torch.float32):
    logits = torch.empty(5, dtype=dtype)
    logits[IDS] = torch.tensor(PROBS, dtype=dtype).log()
    return logits[None]  # [1, 5]


def kept(logits, top_k=0, top_p=1.0):
    out = top_k_top_p_filter(logits, top_k, top_p)
    keep = torch.isfinite(out[0])
    torch.testing.assert_close(out[0][keep], logits[0][keep], atol=0, rtol=0)  # kept logits untouched
    return {IDS.index(i) for i in keep.nonzero()[:, 0].tolist()}  # as ranks 0..4


@pytest.mark.parametrize("top_k,top_p,ranks", [
    (0, 1.0, {0, 1, 2, 3, 4}),
    (0, 0.3, {0}),              # 0.5 alone crosses 0.3
    (0, 0.49, {0}),
    (0, 0.6, {0, 1}),           # 0.5 < 0.6, 0.5 + 0.2 = 0.7 crosses: token 1 kept
    (0, 0.69, {0, 1}),
    (0, 0.71, {0, 1, 2}),       # 0.7 < 0.71, 0.85 crosses
    (0, 0.86, {0, 1, 2, 3}),    # 0.85 < 0.86, 0.95 crosses
    (0, 0.96, {0, 1, 2, 3, 4}),
    (0, 1e-6, {0}),             # the top token always stays
    (1, 1.0, {0}),
    (2, 1.0, {0, 1}),
    (4, 1.0, {0, 1, 2, 3}),
    (9, 1.0, {0, 1, 2, 3, 4}),  # k > V
    (2, 0.6, {0}),              # top-k first, then top-p on the renormalised 5/7, 2/7
    (3, 0.8, {0, 1}),           # within top-3: 0.5/0.85 + 0.2/0.85 = 0.82 crosses 0.8 (unrenormalised: 3 kept)
    (3, 0.83, {0, 1, 2}),
])
def test_top_k_top_p_kept_sets(top_k, top_p, ranks):
    assert kept(hand_logits(), top_k, top_p) == ranks
    assert kept(hand_logits(torch.float64), top_k, top_p) == ranks


def test_top_p_keeps_the_token_that_reaches_it_exactly():
    # uniform over 4 ids: every cumulative mass (0.25, 0.5, 0.75) is exact in floating point
    logits = torch.zeros(2, 4)
    assert torch.isfinite(top_k_top_p_filter(logits, 0, 0.5)).sum(-1).tolist() == [2, 2]  # 0.5 reaches 0.5
    assert torch.isfinite(top_k_top_p_filter(logits, 0, 0.5 + 1e-6)).sum(-1).tolist() == [3, 3]
    assert torch.isfinite(top_k_top_p_filter(logits, 0, 0.75)).sum(-1).tolist() == [3, 3]
    # rows are filtered independently
    two = torch.cat([hand_logits(), hand_logits().flip(-1)])
    assert torch.isfinite(top_k_top_p_filter(two, 0, 0.6)).nonzero().tolist() == [[0, 0], [0, 3], [1, 1], [1, 4]]


SQRT2 = 0.5 ** 0.5 + 0.2 ** 0.5  # T=2 masses of the top two, unnormalised


@pytest.mark.parametrize("kw,expected", [
    (dict(top_p=0.71), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
    (dict(top_k=2), [5 / 7, 2 / 7, 0, 0, 0]),
    (dict(temperature=0.5), [p * p / 0.325 for p in PROBS]),  # p^(1/T) renormalised: sum of squares = 0.325
    # temperature before top-p: at T=2 the top-3 masses are sqrt(p) renormalised, 0.459 < 0.5 keeps 2 tokens
    # (at T=1 the top token's 0.5/0.85 = 0.588 would reach 0.5 alone)
    (dict(temperature=2.0, top_k=3, top_p=0.5), [0.5 ** 0.5 / SQRT2, 0.2 ** 0.5 / SQRT2, 0, 0, 0]),
])
def test_sample_frequencies(kw, expected):
    n = 2000
    g = torch.Generator().manual_seed(0)
    draws = sample_next(hand_logits().expand(n, 5), generator=g, **{"temperature": 1.0, **kw})
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5)[IDS].float() / n  # by rank
    never = [r for r, e in enumerate(expected) if e == 0]
    assert all(freq[r] == 0 for r in never), f"token outside the kept set: {freq.tolist()}"
    torch.testing.assert_close(freq, torch.tensor(expected), atol=0.04, rtol=0)  # ~3.5 sigma at n = 2000


def test_vocab_limit_and_temperature_zero():
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0, 8.0], [2.0, 0.0, 1.0, 0.5, 7.0]])
    assert sample_next(logits, temperature=0).tolist() == [3, 4]
    assert sample_next(logits, temperature=0, vocab_limit=3).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.repeat(1000, 1), temperature=1.0, generator=g, vocab_limit=3)
    assert draws.max() <= 2 and set(draws.tolist()) == {0, 1, 2}
    draws = sample_next(logits.repeat(1000, 1), temperature=1.0, top_p=0.99, generator=g, vocab_limit=3)
    assert draws.max() <= 2


def test_vocab_limit_in_generate(model, greedy):
    limit = 295
    bias = torch.zeros(300)
    bias[limit:] = 100.0  # the unused embedding rows now win every argmax
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        unlimited = generate(model, PROMPTS, 8, (), PAD, temperature=0)
        limited = generate(model, PROMPTS, 8, (), PAD, temperature=0, vocab_limit=limit)
        sampled = generate(model, PROMPTS, 8, (), PAD, temperature=1.0, seed=0, vocab_limit=limit)
    finally:
        handle.remove()
    assert all(x >= limit for o in unlimited for x in o)
    assert all(x < limit for o in sampled for x in o)
    # below the limit the logits are the model's own: greedy is unchanged (it has no id >= 295)
    assert all(x < limit for g in greedy for x in g[:8]) and limited == [g[:8] for g in greedy]


def test_seed_reproducible(model):
    kw = dict(max_new_tokens=N_NEW, stop_ids=(), pad_id=PAD, temperature=1.0, top_p=0.95)
    a = generate(model, PROMPTS, seed=0, **kw)
    assert generate(model, PROMPTS, seed=0, **kw) == a
    assert generate(model, PROMPTS, seed=1, **kw) != a
    assert generate(model, PROMPTS, seed=0, batch_size=2, **kw) == generate(model, PROMPTS, seed=0, batch_size=2, **kw)
    assert [len(o) for o in a] == [N_NEW] * 3 and len({tuple(o) for o in a}) == 3


def test_edge_cases(model):
    assert generate(model, PROMPTS, 0, (), PAD) == [[], [], []]
    assert generate(model, [], 4, (), PAD) == []
    with pytest.raises(AssertionError, match="at least one token"):
        generate(model, [[1], []], 4, (), PAD)
    with pytest.raises(InputError, match="--top-p"):
        top_k_top_p_filter(torch.zeros(1, 3), 0, 0.0)


def test_generate_texts(tmp_path):
    from nanoalign.chat import load_chat
    from nanoalign.toy import build_tokenizer
    chat = load_chat(build_tokenizer(tmp_path / "tok"))
    vocab = 64 * math.ceil((chat.vocab_size + 1) / 64)  # embedding larger than the tokenizer, as in Qwen
    model = load_model(make_hf_model_dir(tmp_path / "m", vocab_size=vocab, initializer_range=0.2))
    convs = [[{"role": "user", "content": "Which is largest: 3, 9, 4?"}], [{"role": "user", "content": "Hello"}]]
    texts = generate_texts(model, chat, convs, max_new_tokens=6, n=2, temperature=0)
    ids = generate(model, [chat.render_prompt(c) for c in convs], 6, chat.stop_ids, chat.pad_id, temperature=0,
                   vocab_limit=chat.vocab_size)
    assert texts == [[chat.decode(o)] * 2 for o in ids]
    sampled = generate_texts(model, chat, convs, max_new_tokens=6, n=3, temperature=1.0, seed=0)
    assert [len(s) for s in sampled] == [3, 3] and all(isinstance(t, str) for s in sampled for t in s)
