"""Generation with continuous batching: a fixed number of slots over a static KV cache; a slot whose sequence has
finished is refilled with the next waiting prompt (prefilled in one forward), while decoding goes on for every slot.

    outs = generate(model, [chat.render_prompt(c) for c in convs], max_new_tokens=256, stop_ids=chat.stop_ids,
                    temperature=0.7, top_p=0.9, seed=0, vocab_limit=chat.vocab_size, keys=[(pid, 0), ...])
    texts = generate_texts(model, chat, convs, max_new_tokens=256, n=4, temperature=1.0, seed=0)
    for i, tokens in Engine(model, slots=64, max_len=2048, stop_ids=chat.stop_ids, ...).stream(requests): ...

The decode step (embed, layers, lm_head, sampling, stop test, bookkeeping) runs on device tensors only: positions,
cache writes, counters and the finished flags never visit the host, so `sync_every` steps run back to back and,
on CUDA, the step is captured by torch.compile(mode="reduce-overhead") (CUDA graphs). Each request draws its
random numbers from its own counter-based stream (nanoalign.sampling.stream_uniform, keyed by (seed, key)), so
its tokens do not depend on the slot it lands in, the other requests, the batch size or a resumed run.
Each output holds the NEW tokens only and ends with the stop token when the row stopped: a row without one was
cut by its max_new_tokens (a truncated completion).
"""
from collections import deque

import torch

from nanoalign.errors import InputError
from nanoalign.model import KVCache
from nanoalign.sampling import sample_next, stream_key


def check_context(config, positions):
    """A KV cache of `positions` (the longest prompt plus max_new_tokens) must fit the model's context (config
    max_position_embeddings): the scripts check it before loading the weights, the Engine before its allocation.

    Raises:
        InputError: naming --max-new-tokens and --max-prompt-len, the flags that set it.
    """
    if positions > config.max_position_embeddings:
        raise InputError(f"the longest prompt plus --max-new-tokens need {positions} positions, more than the "
                         f"model's context of {config.max_position_embeddings} (max_position_embeddings in its "
                         f"config.json): lower --max-new-tokens (or --max-prompt-len)")


class Engine:
    """Continuous batching over `slots` sequences of at most `max_len` tokens (prompt + new) each.

    Args:
        model: CausalLM (LoRA-wrapped layers fine), in its dtype and device.
        slots: sequences decoded together (the decode batch).
        max_len: KV cache length per slot: the longest prompt plus its max_new_tokens must fit, and it must fit the
            model's context (config max_position_embeddings; InputError naming --max-new-tokens otherwise).
        stop_ids: ids that end a row (pass both <|im_end|> and <|endoftext|> for Qwen, PITFALLS #2).
        temperature, top_k, top_p, vocab_limit: see nanoalign.sampling.sample_next.
        sync_every: decode steps between two looks of the host at the finished flags (the only syncs).
        compile: capture the decode step with torch.compile(mode="reduce-overhead"); None = on CUDA only.
        min_span: attention reads the first `span` cache slots, a power of two >= min_span covering every live
            position (a handful of shapes, one graph each), not max_len every step.
        prefill_tokens: at most this many (padded) tokens per prefill forward.
        pad_id: token that right-pads a prefill batch (never attended to).
    """

    def __init__(self, model, slots, max_len, stop_ids, temperature=1.0, top_k=0, top_p=1.0, vocab_limit=None,
                 sync_every=8, compile=None, min_span=256, prefill_tokens=16384, pad_id=0):
        check_context(model.config, max_len)  # before the cache is allocated: 10^9 new tokens asked for 1.6 TB
        param = next(model.parameters())
        self.model, self.device, self.slots, self.max_len = model, param.device, slots, max_len
        self.sync_every, self.min_span, self.prefill_tokens, self.pad_id = sync_every, min_span, prefill_tokens, pad_id
        self.seed = 0
        self.sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
        self.cache = KVCache(model.config, slots, max_len, param.dtype, self.device)
        zeros = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=self.device)  # noqa: E731
        self.tok, self.pos, self.n_new, self.limit = zeros(), zeros(), zeros(), zeros()  # per slot
        self.active = zeros(torch.bool)
        self.keys = torch.zeros(slots, 2, dtype=torch.long, device=self.device)
        self.out = torch.zeros(slots, max_len + 1, dtype=torch.long, device=self.device)  # new tokens per slot
        self.stop = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=self.device)
        self.step = self._decode
        if self.device.type == "cuda" if compile is None else compile:
            for t in [*self.cache.k, *self.cache.v, self.tok, self.pos, self.n_new, self.limit, self.active,
                      self.keys, self.out]:
                torch._dynamo.mark_static_address(t)  # updated in place: the graph keeps their addresses
            # span is the one size that changes: after its second value it is compiled as a dynamic size
            self.step = torch.compile(self._decode, mode="reduce-overhead", fullgraph=True)

    def _decode(self, span):
        """One token for every slot (idle slots compute and are ignored): static shapes, no host sync."""
        self.cache.rows, self.cache.span = None, span
        hidden = self.model(self.tok[:, None], position_ids=self.pos[:, None], kv_cache=self.cache,
                            return_hidden=True)  # [slots, 1, d]
        tok = sample_next(self.model.lm_head(hidden[:, 0]), streams=(self.keys, self.n_new), **self.sample_kw)
        live = self.active
        self.out.scatter_(1, self.n_new[:, None], tok[:, None])  # an idle slot writes past its row's end
        n_new = self.n_new + live
        stopped = (tok[:, None] == self.stop).any(-1) | (n_new >= self.limit)
        self.n_new.copy_(n_new)
        self.pos.add_(live.long())
        self.tok.copy_(tok)
        self.active.copy_(live & ~stopped)

    def _prefill(self, slots, prompts):
        """Write all but the last token of each prompt into its (fresh) slot; the last one is fed by the next decode
        step, which samples the first new token. Batched by length, right-padded, in chunks of prefill_tokens."""
        order = sorted(range(len(slots)), key=lambda i: len(prompts[i]))
        chunk = []
        for n, i in enumerate(order):
            chunk.append(i)
            t = len(prompts[i]) - 1
            nxt = len(prompts[order[n + 1]]) - 1 if n + 1 < len(order) else None
            if nxt is None or (len(chunk) + 1) * nxt > self.prefill_tokens:
                if t > 0:
                    ids = torch.full((len(chunk), t), self.pad_id, dtype=torch.long)
                    for r, j in enumerate(chunk):
                        ids[r, :len(prompts[j]) - 1] = torch.tensor(prompts[j][:-1])
                    self.cache.rows = torch.tensor([slots[j] for j in chunk], device=self.device)
                    positions = torch.arange(t, device=self.device).expand(len(chunk), t)
                    self.model(ids.to(self.device), position_ids=positions, kv_cache=self.cache, return_hidden=True)
                    self.cache.rows = None
                chunk = []

    def _admit(self, slots, requests):
        """Start requests (prompt, max_new_tokens, key) in free slots: prefill, then the decode state of each slot."""
        self._prefill(slots, [p for p, _, _ in requests])
        idx = torch.tensor(slots, device=self.device)
        state = [(p[-1], len(p) - 1, m, *stream_key(self.seed, key)) for p, m, key in requests]
        tok, pos, limit, k0, k1 = torch.tensor(state, dtype=torch.long).to(self.device).unbind(1)
        self.tok[idx], self.pos[idx], self.limit[idx], self.n_new[idx] = tok, pos, limit, 0
        self.keys[idx] = torch.stack([k0, k1], dim=1)
        self.active[idx] = True

    def _span(self, furthest):
        span = self.min_span
        while span < furthest and span < self.max_len:
            span *= 2
        return min(span, self.max_len)

    @torch.inference_mode()
    def stream(self, requests, seed=0):
        """Run requests to completion, refilling slots as rows finish.

        Args:
            requests: iterable of (prompt ids, max_new_tokens, key); key (hashable, e.g. (prompt_id, k)) names
                the request's random stream with the seed. Read lazily, as slots free up.
        Yields:
            (request number in input order, list of new token ids) as each request finishes.
        """
        self.seed = seed
        self.active.zero_()  # a stream left unfinished (an exception in the caller) leaves nothing running
        waiting, todo = deque(), iter(requests)
        busy = {}  # slot -> [request number, prompt length, new tokens at the last look]
        number = 0
        while True:
            free = [s for s in range(self.slots) if s not in busy]
            while len(waiting) < len(free):
                nxt = next(todo, None)
                if nxt is None:
                    break
                prompt, max_new, key = nxt
                assert len(prompt) > 0, "every prompt needs at least one token"
                assert len(prompt) + max_new <= self.max_len, \
                    f"prompt of {len(prompt)} tokens + {max_new} new exceeds the cache length {self.max_len}"
                if max_new <= 0:
                    yield number, []
                else:
                    waiting.append((number, (list(prompt), max_new, key)))
                number += 1
            if waiting and free:
                new = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                self._admit(free[:len(new)], [r for _, r in new])
                for s, (i, (prompt, _, _)) in zip(free, new):
                    busy[s] = [i, len(prompt), 0]
            if not busy:
                return
            # attention reads keys up to each live position, which grows by one a step
            span = self._span(max(plen + n for _, plen, n in busy.values()) + self.sync_every)
            for _ in range(self.sync_every):
                self.step(span)
            active, n_new = self.active.tolist(), self.n_new.tolist()  # the host check: the only sync
            for s in list(busy):
                if active[s]:
                    busy[s][2] = n_new[s]
                else:
                    yield busy.pop(s)[0], self.out[s, :n_new[s]].tolist()


def generate(model, prompts, max_new_tokens, stop_ids, pad_id=0, temperature=1.0, top_k=0, top_p=1.0, seed=None,
             vocab_limit=None, batch_size=None, keys=None, **engine_kw):
    """Sample continuations of token-id prompts of different lengths with the Engine; results in input order.

    Args:
        model: CausalLM (LoRA-wrapped layers fine); runs in its dtype and device, under inference_mode.
        prompts: list of non-empty lists of token ids.
        max_new_tokens: int, or one int per prompt.
        stop_ids: iterable of ids that end a row (may be empty).
        pad_id: right-pads prefill batches (never attended to, never returned).
        temperature, top_k, top_p, vocab_limit: see sample_next (temperature 0 = greedy).
        seed: with keys, names each prompt's random stream (None: a fresh seed from torch's global RNG).
        batch_size: slots, i.e. sequences decoded together (None = all prompts at once).
        keys: one hashable per prompt naming its stream, e.g. (prompt_id, sample index); default: its index.
            A prompt's output depends only on (seed, key, prompt, settings), not on batch_size or the others.
        engine_kw: Engine's sync_every, compile, min_span, prefill_tokens.
    Returns:
        One list per prompt of the NEW token ids, ending with the stop id if the row stopped; a row without a stop
        id was cut at max_new_tokens.
    """
    assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
    if not prompts:
        return []
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seed = int(torch.randint(2 ** 62, ())) if seed is None else seed
    keys = range(len(prompts)) if keys is None else keys
    slots = min(batch_size or len(prompts), len(prompts))
    need = max(len(p) + m for p, m in zip(prompts, budgets))
    # a power of two (a later call with other lengths may reuse the engine), cut to the model's context
    max_len = max(need, min(1 << (need - 1).bit_length(), model.config.max_position_embeddings))
    engine = _engine(model, slots, max_len, stop_ids, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                           vocab_limit=vocab_limit, pad_id=pad_id, **engine_kw))
    results = [None] * len(prompts)
    for i, tokens in engine.stream(zip(prompts, budgets, keys), seed):
        results[i] = tokens
    return results


def _engine(model, slots, max_len, stop_ids, kw):
    """The engine of the model's previous generate call when it fits (a compiled decode step and its CUDA graphs
    are kept: eval_winrate calls generate once per round), else a new one."""
    settings = (slots, tuple(sorted(set(stop_ids or ()))), tuple(sorted(kw.items())))
    engine = getattr(model, "_nanoalign_engine", None)
    if engine is None or engine.settings != settings or engine.max_len < max_len:
        engine = Engine(model, slots, max_len, stop_ids, **kw)
        engine.settings = settings
        model._nanoalign_engine = engine
    return engine


def generate_texts(model, chat, conversations, max_new_tokens, n=1, **kw):
    """n sampled replies per conversation, decoded without special tokens (so truncation is no longer visible:
    use generate for that). chat is a nanoalign.chat.Chat; its stop ids, pad id and vocab size are the defaults;
    reply k of conversation c is keyed (c, k).

    Returns:
        [len(conversations)][n] strings.
    """
    kw = dict(stop_ids=chat.stop_ids, pad_id=chat.pad_id, vocab_limit=chat.vocab_size) | kw
    prompts = [chat.render_prompt(c) for c in conversations for _ in range(n)]
    keys = [(c, k) for c in range(len(conversations)) for k in range(n)]
    texts = [chat.decode(o) for o in generate(model, prompts, max_new_tokens, keys=keys, **kw)]
    return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]
