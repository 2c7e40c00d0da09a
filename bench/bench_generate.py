"""nanoalign's generation engine (nanoalign.engine) at Qwen2.5-0.5B / 1.5B shapes, bf16 random weights: new tokens/s.

    python bench/bench_generate.py                          # ours: bs1, bs64, synth, workload, sdpa (0.5B)
    python bench/bench_generate.py --peer                   # + HF generate on the same shapes, same weights, ratios
    python bench/bench_generate.py --shape 1.5b --cases workload --peer --hf-cases workload+static
    python bench/bench_generate.py --peer --cases bs1 --hf-cases bs1
    python bench/bench_generate.py --tiny --peer            # CPU smoke test (tiny config, a few new tokens)

Cases (--cases, comma-separated): bsN = N prompts of --prompt-len (128) random tokens, --new-tokens (256) new
tokens each, temperature 0.7, top_p 0.95 (the peer's settings); synth = gen_synthetic.py's old round: --synth-prompts
(16) prompts of random lengths in [--synth-min-len, --synth-max-len] (32..256), each sampled --synth-n (4) times,
64 rows, temperature 0.8, top_p 0.95, vocab_limit 151,665 (Qwen's tokenizer size). In these three early stopping is
off, so every row makes exactly --new-tokens tokens.
workload = the synthetic-preference workload of issue #12: --workload-prompts (512) prompts with log-normal lengths
(median --workload-median-len 120, sigma 0.8, capped at 1,024, at least 8), each sampled --workload-n (4) times, and
per-row answer lengths drawn from a fixed distribution (log-normal, median 200, sigma 0.7, in [16, 512] =
--workload-max-new): random weights never stop on their own, so each row's stop is forced at its drawn length, for us
by its max_new_tokens (the engine's per-row budget) and for HF by a logits processor that forbids the stop id before
the drawn length and forces it there. Ours runs all rows through --slots (256) slots with continuous batching; HF
runs rows in prompt order in static batches of --hf-batch (64) (each batch waits for its longest row) on the first
--hf-workload-prompts (64) prompts only, to fit the time budget: compare new tokens/s, not seconds.
Every case: one identical untimed call first (it compiles the CUDA-graph decode step: `warmup_s`), then --repeats
timed calls (median). sdpa = a diagnostic: which SDPA backends accept the masked GQA attention call, and the
decode-step attention as our engine runs it (nanoalign.model.grouped_decode_attention) vs SDPA masked GQA vs K/V
expanded to all heads.

--peer builds transformers' Qwen2ForCausalLM from the same config in the same process, loads OUR state dict into
it (identical weights; the prefill logits of both are compared and reported as logits_rel_diff), and times
`generate(do_sample=True, ...)` as shared/bench/peer_bench.py does (cases named hf_inproc_*, apart from the
peer script's own hf_generate_*), with the dynamic cache and with cache_implementation="static" (--hf-cases:
bs1, bs64, synth, workload, bs64+static, workload+static, ...). Each HF result carries ours_over_hf = our new
tokens/s / HF's on the same case. Goals: >= 15x HF at batch 1 (and >= 1000 tok/s), >= 5x at batch 64; workload
>= 20,000 new tok/s at 0.5B and >= 10x HF.
"""
import math
import random
import time

import torch

import common
from nanoalign.engine import generate
from nanoalign.model import grouped_decode_attention

QWEN_TOKENIZER_VOCAB = 151665  # chat.vocab_size of Qwen2.5's tokenizer: gen_synthetic.py's vocab_limit
SHAPES = {"0.5b": common.QWEN05, "1.5b": common.QWEN15}


def parse_case(spec):
    parts = spec.strip().split("+")
    c = dict(name=parts[0], static="static" in parts[1:])
    if parts[0] == "sdpa":
        c["kind"] = "sdpa"
    elif parts[0] in ("synth", "workload"):
        c["kind"] = parts[0]
    elif parts[0].startswith("bs"):
        c["kind"], c["bs"] = "plain", int(parts[0][2:])
    else:
        raise ValueError(f"unknown case {spec!r}: bsN, synth, workload or sdpa (+static for --hf-cases)")
    return c


def make_prompts(c, args, config):
    """(prompt id lists, new tokens per row, sampling kwargs, number of distinct prompts)."""
    rng = random.Random(0)
    high = common.token_high(config)
    if c["kind"] == "plain":
        prompts = [[rng.randrange(high) for _ in range(args.prompt_len)] for _ in range(c["bs"])]
        return prompts, [args.new_tokens] * len(prompts), dict(temperature=0.7, top_p=0.95), len(prompts)
    vocab_limit = min(QWEN_TOKENIZER_VOCAB, config.vocab_size)
    kw = dict(temperature=0.8, top_p=0.95, vocab_limit=vocab_limit)
    if c["kind"] == "synth":
        distinct = [[rng.randrange(high) for _ in range(rng.randint(args.synth_min_len, args.synth_max_len))]
                    for _ in range(args.synth_prompts)]
        prompts = [p for p in distinct for _ in range(args.synth_n)]  # as gen_synthetic.py lays them out
        return prompts, [args.new_tokens] * len(prompts), kw, len(distinct)
    lens = [min(1024, max(8, round(rng.lognormvariate(math.log(args.workload_median_len), 0.8))))
            for _ in range(args.workload_prompts)]
    distinct = [[rng.randrange(high) for _ in range(n)] for n in lens]
    prompts = [p for p in distinct for _ in range(args.workload_n)]
    budgets = [min(args.workload_max_new, max(16, round(rng.lognormvariate(math.log(200), 0.7))))
               for _ in prompts]
    if args.tiny:
        budgets = [max(2, b * args.workload_max_new // 512) for b in budgets]
    return prompts, budgets, kw, len(distinct)


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        common.sync(device)
        t0 = time.perf_counter()
        out = fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def run_ours(c, args, config, model):
    device = args.device
    prompts, budgets, kw, n_distinct = make_prompts(c, args, config)
    slots = args.slots if c["kind"] == "workload" else len(prompts)
    call = lambda: generate(model, prompts, budgets, stop_ids=[], pad_id=common.pad_id(config), seed=1,  # noqa: E731
                            batch_size=slots, compile=None if args.compile == "auto" else args.compile == "on", **kw)
    common.reset_peak(device)
    warmup_s, _ = timed(call, device, 1)  # compiles the decode step (CUDA) for every span it meets
    s, outs = timed(call, device, args.repeats)
    assert [len(o) for o in outs] == budgets, "a row stopped early: the work is not fixed"
    new = sum(budgets)
    return dict(case=f"ours_generate_{c['name']}{args.shape_suffix}", rows=len(prompts), prompts=n_distinct,
                slots=slots, prompt_len=[min(map(len, prompts)), max(map(len, prompts))],
                new_tokens=new, seconds=s, warmup_s=warmup_s, new_tokens_per_s=new / s, prompts_per_s=n_distinct / s,
                ms_per_decode_step=1000 * s * slots / new, peak_gib=common.peak_gib(device), **kw)


@torch.no_grad()
def sdpa_probe(args, config):
    """Which SDPA backends take our attention call with a boolean mask AND enable_gqa=True (every decode step and
    prefill of the sampler, padded reward batches), and what that costs against K/V expanded to all heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    device, dtype = args.device, torch.bfloat16
    b, s = (4, 24) if args.tiny else (64, args.prompt_len + args.new_tokens)
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out = dict(case="sdpa_probe_masked_gqa", batch=b, keys=s, heads=h, kv_heads=kv)
    for name, t in (("decode", 1), ("prefill", s // 3)):
        q = torch.randn(b, h, t, hd, device=device, dtype=dtype)
        k, v = (torch.randn(b, kv, s, hd, device=device, dtype=dtype) for _ in range(2))
        q_slot = torch.arange(s - t, s, device=device)[:, None]  # queries are the last t slots, as in decoding
        mask = (torch.arange(s, device=device)[None, :] <= q_slot).expand(b, 1, t, s)  # [b, 1, t, s] bool
        accepted = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                accepted.append(backend.name)
            except Exception:
                pass
        ke, ve = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)

        def ms(fn, n=20):
            fn()
            common.sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            common.sync(device)
            return 1000 * (time.perf_counter() - t0) / n
        out[f"{name}_backends_accepting_mask_gqa"] = accepted
        out[f"{name}_ms_as_called"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        out[f"{name}_ms_kv_expanded"] = ms(lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask))
        if t == 1:  # what the engine's decode step runs
            out[f"{name}_ms_grouped_engine"] = ms(lambda: grouped_decode_attention(q, k, v, mask))
    return out


def build_hf(config_dict, model, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**config_dict)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied
    assert not missing and not unexpected, f"state dict mismatch: missing {missing[:4]} unexpected {unexpected[:4]}"
    hf.tie_weights()
    return hf.eval()


@torch.no_grad()
def logits_rel_diff(model, hf, config, device):
    """max |ours - HF| / max |HF| over the last-position logits of 2 random prompts: same weights, same function."""
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, common.token_high(config), (2, 32), device=device, generator=g)
    ours = model(ids)[:, -1].float()
    theirs = hf(ids).logits[:, -1].float()
    return float((ours - theirs).abs().max() / theirs.abs().max())


class ForcedStops:
    """HF logits processor: row r may not emit `stop` before its drawn length and must emit it at that length."""

    def __init__(self, budgets, prompt_len, stop):
        self.budgets, self.prompt_len, self.stop = budgets, prompt_len, stop

    def __call__(self, input_ids, scores):
        made = input_ids.shape[1] - self.prompt_len  # new tokens so far; this call picks token made + 1
        at_end = (self.budgets == made + 1)[:, None]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.stop] = 0.0
        scores = scores.clone()
        scores[:, self.stop] = float("-inf")
        return torch.where(at_end, forced, scores)


def left_pad(prompts, pad, device):
    t = max(map(len, prompts))
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF decoder-only generation wants
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def run_hf(c, args, config, hf, ours_by_name):
    device = args.device
    prompts, budgets, kw, n_distinct = make_prompts(c, args, config)
    pad = common.pad_id(config)
    gkw = dict(do_sample=True, temperature=kw["temperature"], top_p=kw["top_p"], pad_token_id=pad)
    if c["static"]:
        gkw["cache_implementation"] = "static"
    if c["kind"] != "workload":
        ids, mask = left_pad(prompts, pad, device)
        new = budgets[0]
        call = lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gkw)  # noqa: E731
        hf.generate(ids, attention_mask=mask, **{**gkw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        common.reset_peak(device)
        s, out = timed(call, device, args.repeats)
        assert out.shape[1] == ids.shape[1] + new, f"HF made {out.shape[1] - ids.shape[1]} tokens, not {new}"
        made = len(prompts) * new
    else:
        from transformers import LogitsProcessorList
        rows = args.hf_workload_prompts * args.workload_n
        prompts, budgets = prompts[:rows], budgets[:rows]
        n_distinct = args.hf_workload_prompts
        batches = []
        for i in range(0, rows, args.hf_batch):
            ids, mask = left_pad(prompts[i:i + args.hf_batch], pad, device)
            b = torch.tensor(budgets[i:i + args.hf_batch], device=device)
            batches.append((ids, mask, b))

        def call():
            outs = []
            for ids, mask, b in batches:
                forced = LogitsProcessorList([ForcedStops(b, ids.shape[1], pad)])
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=int(b.max()), eos_token_id=pad,
                                  logits_processor=forced, **gkw)
                outs.append(((out[:, ids.shape[1]:] != pad).sum(-1) + 1).tolist())  # new tokens, the stop included
            return [n for o in outs for n in o]
        ids, mask, b = batches[0]
        hf.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **gkw)  # warm-up
        common.reset_peak(device)
        s, made_per_row = timed(call, device, args.repeats)
        assert made_per_row == budgets, "HF's forced stops did not land at the drawn lengths"
        made = sum(budgets)
    tps = made / s
    r = dict(case=f"hf_inproc_generate_{'static' if c['static'] else 'dynamic'}_{c['name']}{args.shape_suffix}",
             rows=len(prompts), prompts=n_distinct, new_tokens=made, seconds=s, new_tokens_per_s=tps,
             prompts_per_s=n_distinct / s, peak_gib=common.peak_gib(device),
             temperature=kw["temperature"], top_p=kw["top_p"])
    ours = ours_by_name.get(c["name"])
    if ours and "new_tokens_per_s" in ours:
        r["ours_case"], r["ours_over_hf"] = ours["case"], ours["new_tokens_per_s"] / tps
    return r


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per case (median)")
    p.add_argument("--synth-prompts", type=int, default=16)
    p.add_argument("--synth-n", type=int, default=4)
    p.add_argument("--synth-min-len", type=int, default=32)
    p.add_argument("--synth-max-len", type=int, default=256)
    p.add_argument("--workload-prompts", type=int, default=512)
    p.add_argument("--workload-n", type=int, default=4)
    p.add_argument("--workload-median-len", type=int, default=120)
    p.add_argument("--workload-max-new", type=int, default=512)
    p.add_argument("--slots", type=int, default=256, help="workload: sequences our engine decodes together")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="our decode step under torch.compile(mode='reduce-overhead'); auto = on CUDA")
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--peer", action="store_true", help="also time HF generate on the same shapes and weights")
    p.add_argument("--hf-cases", default="bs1,bs64,synth,bs64+static,workload+static")  # static (compiles) last
    p.add_argument("--hf-batch", type=int, default=64, help="workload: HF's static batch")
    p.add_argument("--hf-workload-prompts", type=int, default=64, help="workload: HF runs the first this-many prompts")
    args = common.setup(p.parse_args(), warmup=0, steps=0)
    shapes = common.TINY if args.tiny else SHAPES[args.shape]
    args.shape_suffix = "" if args.shape == "0.5b" else "_" + args.shape.replace(".", "")
    config = common.model_config(shapes)
    if args.tiny:
        args.prompt_len, args.new_tokens = 16, 8
        args.synth_prompts, args.synth_n, args.synth_min_len, args.synth_max_len = 3, 2, 4, 16
        args.workload_prompts, args.workload_median_len, args.workload_max_new = 12, 12, 12
        args.slots, args.hf_batch, args.hf_workload_prompts = 8, 8, 4
        specs = args.cases or "bs1,bs4,synth,workload,sdpa"
        hf_specs = args.hf_cases if args.hf_cases != p.get_default("hf_cases") else \
            "bs1,bs4,synth,bs4+static,workload+static"
    else:
        specs, hf_specs = args.cases or "bs1,bs64,synth,workload,sdpa", args.hf_cases
    print(common.env_line(), flush=True)
    device = args.device
    common.reset_memory(device)
    model = common.build_causal_lm(config, device, torch.bfloat16).eval()

    ours_by_name = {}

    def ours_case(c):
        def fn():
            r = run_ours(c, args, config, model)
            ours_by_name[c["name"]] = r
            return r
        return fn

    cases = [parse_case(s) for s in specs.split(",") if s.strip()]
    common.run_cases([("sdpa_probe", lambda: sdpa_probe(args, config)) if c["kind"] == "sdpa" else
                      (f"ours_generate_{c['name']}", ours_case(c)) for c in cases], args)
    if not args.peer:
        return

    hf = build_hf(common.hf_config(shapes), model, device)
    common.emit(dict(case="hf_inproc_vs_ours_prefill_logits", logits_rel_diff=logits_rel_diff(model, hf, config, device),
                     **common.meta(args)))
    hf_cases = [parse_case(s) for s in hf_specs.split(",") if s.strip()]
    common.run_cases([(f"hf_inproc_generate_{c['name']}", lambda c=c: run_hf(c, args, config, hf, ours_by_name))
                      for c in hf_cases], args)


if __name__ == "__main__":
    main()
