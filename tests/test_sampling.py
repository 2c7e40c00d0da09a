"""The sampler: greedy continuous batching equals the uncached argmax, stop ids, top-k/top-p kept sets and
frequencies, vocab_limit, seeds; a prompt's samples do not depend on batch size, slot order or a resumed run."""
import math

import pytest
import torch

from conftest import make_hf_model_dir
from nanoalign.errors import InputError
from nanoalign.model import load_model
from nanoalign.engine import generate, generate_texts
from nanoalign.sampling import hash31, sample_next, stream_key, stream_uniform, top_k_top_p_filter

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


def count_decode_steps(model):
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_greedy_continuous_batching_equals_uncached_argmax(model, greedy):
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

    # rows that stop at steps 1, 2 and 0
    stops = {greedy[0][1], greedy[1][2], greedy[2][0]}
    expected = []
    for g in greedy:
        first = next(i for i, x in enumerate(g) if x in stops)
        expected.append(g[:first + 1])
    assert [len(e) for e in expected] == [2, 3, 1]
    calls, handle = count_decode_steps(model)
    try:
        assert generate(model, PROMPTS, N_NEW, stop_ids=stops, pad_id=PAD, temperature=0, sync_every=1) == expected
    finally:
        handle.remove()
    assert len(calls) == 3  # one decode step per token of the longest row, then the host sees all rows done

    calls, handle = count_decode_steps(model)
    try:
        outs = generate(model, PROMPTS, 5, stop_ids=(), pad_id=PAD, temperature=0, sync_every=4)
    finally:
        handle.remove()
    assert outs == [g[:5] for g in greedy] and len(calls) == 8  # host looks every 4 steps


def test_continuous_batching_refills_slots(model):
    """8 prompts through 3 slots with per-prompt budgets and a stop id: each finished slot is refilled (stale cache
    and all), attention spans grow 4 -> 8 -> 16 -> 32, and every output is the uncached argmax's."""
    prompts = [PROMPTS[i % 3][i % 2:] + [i + 20] for i in range(8)]
    budgets = [3, 9, 1, 12, 5, 2, 7, 10]
    refs = [reference_greedy(model, p, m) for p, m in zip(prompts, budgets)]
    stop = refs[3][2]
    expected = [r[:r.index(stop) + 1] if stop in r else r for r in refs]
    assert sum(stop in r for r in refs) >= 2 and len({len(e) for e in expected}) >= 5
    spans = []
    hook = model.model.register_forward_pre_hook(lambda m, args: spans.append(args[3].span))  # args[3]: the cache
    try:
        outs = generate(model, prompts, budgets, stop_ids=(stop,), pad_id=PAD, temperature=0, batch_size=3,
                        sync_every=2, min_span=4)
    finally:
        hook.remove()
    assert outs == expected
    assert set(spans) == {16, 32}  # a power of two >= longest live row + sync_every, capped at the cache length


def test_samples_do_not_depend_on_batch_size_or_resume(model):
    prompts = [PROMPTS[i % 3][i % 2:] + [i + 20] for i in range(8)]
    kw = dict(max_new_tokens=N_NEW, stop_ids=(), pad_id=PAD, temperature=1.0, top_p=0.9, seed=5)
    runs = [generate(model, prompts, batch_size=b, sync_every=s, **kw) for b, s in ((1, 3), (3, 1), (8, 8))]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(o) for o in runs[0]}) == 8
    # a run resumed after the first 3 prompts, the rest in another order: same samples, keyed by prompt; the
    # second call reuses the first one's engine (its compiled step on CUDA) and whatever its slots still hold
    order = [6, 3, 7, 5, 4]
    generate(model, prompts[:4], batch_size=2, **kw)
    engine = model._nanoalign_engine
    resumed = generate(model, [prompts[i] for i in order], keys=order, batch_size=2, **kw)
    assert model._nanoalign_engine is engine
    assert resumed == [runs[0][i] for i in order]
    # the key names the stream: the same prompt under two keys samples differently, under one key identically
    twice = generate(model, [prompts[0]] * 3, keys=[0, 1, 0], batch_size=3, **kw)
    assert twice[0] == twice[2] == runs[0][0] != twice[1]
    assert generate(model, prompts, batch_size=3, **{**kw, "seed": 6}) != runs[0]


def test_decode_step_is_one_graph(model):
    """The decode step traces whole (fullgraph: no host sync, no data-dependent Python) and gives the eager
    result; CUDA captures the same function with mode="reduce-overhead"."""
    from nanoalign.engine import Engine
    results = []
    for compiled in (False, True):
        engine = Engine(model, 3, 32, stop_ids=(7,), temperature=1.0, top_k=20, top_p=0.9, vocab_limit=290,
                        sync_every=2, min_span=8)
        if compiled:
            torch._dynamo.reset()
            engine.step = torch.compile(engine._decode, backend="eager", fullgraph=True, dynamic=False)
        results.append(dict(engine.stream(((p, 6, i) for i, p in enumerate(PROMPTS * 2)), seed=1)))
    assert results[0] == results[1] and len(results[0]) == 6


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
@pytest.mark.parametrize("source", ["generator", "streams"])
def test_sample_frequencies(kw, expected, source):
    n = 2000
    if source == "generator":
        draw = dict(generator=torch.Generator().manual_seed(0))
    else:  # counter-based: one stream per row (keys) at token index 3
        draw = dict(streams=(torch.tensor([stream_key(0, i) for i in range(n)]), torch.full((n,), 3)))
    draws = sample_next(hand_logits().expand(n, 5), **draw, **{"temperature": 1.0, **kw})
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5)[IDS].float() / n  # by rank
    never = [r for r, e in enumerate(expected) if e == 0]
    assert all(freq[r] == 0 for r in never), f"token outside the kept set: {freq.tolist()}"
    torch.testing.assert_close(freq, torch.tensor(expected), atol=0.04, rtol=0)  # ~3.5 sigma at n = 2000


def test_counter_based_streams():
    """hash31 is a bijection on 31-bit values (no int64 overflow); a row's uniform depends on its key and counter
    only, and is uniform enough: the mean and a histogram over many keys."""
    x = torch.arange(2 ** 16) * 32749  # 65,536 distinct 31-bit values
    assert hash31(x).unique().numel() == x.numel() and hash31(x).max() < 2 ** 31 and hash31(x).min() >= 0
    assert hash31(torch.tensor([0, 1, 2])).tolist() == [0, 824515495, 1722258072]  # fixed for good: resumes rely on it
    keys = torch.tensor([stream_key(0, ("p", k)) for k in range(4000)])
    u = stream_uniform(keys, torch.full((4000,), 7))
    assert ((u > 0) & (u < 1)).all() and abs(u.mean().item() - 0.5) < 0.02
    assert torch.histc(u, bins=10, min=0, max=1).min() > 330  # ~400 per bin
    # row 5's draw alone, inside a batch, or at another counter
    assert stream_uniform(keys[5:6], torch.tensor([7])).item() == u[5].item()
    assert stream_uniform(keys[5:6], torch.tensor([8])).item() != u[5].item()
    assert stream_key(0, ("p", 1)) == stream_key(0, ("p", 1)) != stream_key(1, ("p", 1))


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


def test_cache_past_the_models_context_is_refused_before_it_is_allocated(model, greedy, monkeypatch):
    """The KV cache holds prompt + max_new_tokens positions: past the model's context (max_position_embeddings) it is
    one InputError naming --max-new-tokens, before any allocation (--max-new-tokens 1000000000 asked for 1.6 TB).
    Up to the context it runs: generate's power-of-two cache length is cut to the context, not refused."""
    monkeypatch.setattr(model.config, "max_position_embeddings", 40)
    monkeypatch.delattr(model, "_nanoalign_engine", raising=False)  # one made for the real context, kept by generate
    outs = generate(model, PROMPTS, 40 - len(PROMPTS[2]), (), PAD, temperature=0)  # 40 positions, not 64
    assert [len(o) for o in outs] == [28] * 3 and [o[:N_NEW] for o in outs] == greedy
    for new in (40 - len(PROMPTS[2]) + 1, 10 ** 9):
        with pytest.raises(InputError) as error:
            generate(model, PROMPTS, new, (), PAD, temperature=0)
        assert str(error.value) == (f"the longest prompt plus --max-new-tokens need {len(PROMPTS[2]) + new} positions, "
                                    f"more than the model's context of 40 (max_position_embeddings in its "
                                    f"config.json): lower --max-new-tokens (or --max-prompt-len)")


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


def test_stops_on_both_qwen_stop_ids(tmp_path):
    """Rows end at <|im_end|> and at <|endoftext|> (chat.stop_ids, generate_texts' default): the model is steered to
    say <|im_end|> after token X and <|endoftext|> after token Y, which two greedy rows emit at steps 1 and 2."""
    from nanoalign.chat import load_chat
    from nanoalign.toy import build_tokenizer
    chat = load_chat(build_tokenizer(tmp_path / "tok"))
    model = load_model(make_hf_model_dir(tmp_path / "m", vocab_size=64 * math.ceil((chat.vocab_size + 1) / 64),
                                         initializer_range=0.2))
    prompts = [chat.render_prompt([{"role": "user", "content": q}]) for q in ("Which is largest: 3, 9, 4?", "Hi")]
    free = generate(model, prompts, 6, stop_ids=(), vocab_limit=chat.vocab_size, temperature=0)
    x, y = free[0][1], free[1][2]
    assert x not in free[0][:1] + free[1][:3] + [prompts[0][-1], prompts[1][-1]]
    assert y not in free[0][:2] + free[1][:2] + [prompts[0][-1], prompts[1][-1]] and x != y
    assert not set(chat.stop_ids) & set(free[0] + free[1])
    fed = []
    pre = model.model.register_forward_pre_hook(lambda m, args: fed.append(args[0][:, -1]))  # [b] tokens fed

    def steer(module, inputs, out):  # decode: out [b, V]
        out = out.clone()
        out[:, chat.im_end_id] += 1e4 * (fed[-1] == x)
        out[:, chat.endoftext_id] += 1e4 * (fed[-1] == y)
        return out
    post = model.lm_head.register_forward_hook(steer)
    try:
        outs = generate(model, prompts, 6, stop_ids=chat.stop_ids, vocab_limit=chat.vocab_size, temperature=0)
    finally:
        pre.remove()
        post.remove()
    assert outs == [free[0][:2] + [chat.im_end_id], free[1][:3] + [chat.endoftext_id]]
