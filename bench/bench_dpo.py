"""LoRA DPO step of nanoalign at Qwen2.5-0.5B shapes (random weights): pairs/s and peak memory.

    python bench/bench_dpo.py                                      # one case: fp32 base, reference forward
    python bench/bench_dpo.py --cases fp32,fp32+precompute,bf16,bf16+precompute,bf16+drop0   # run_all.sh's set
    python bench/bench_dpo.py --tiny                               # CPU smoke test (tiny config, 3 steps)

The peer's workload (shared/bench/peer_bench.py dpo): LoRA r 8, alpha 16, dropout 0.05 on all seven projections
(q k v o gate up down), 4 pairs per step, 256 prompt + 512 response tokens, bf16 autocast, beta 0.1. A step is
train_dpo.py's (grad_accum 1, one process): ONE forward of chosen and rejected concatenated ([2b, t]) with
return_hidden=True, nanoalign.losses.sequence_logps on the response tokens; the reference is the same model
under `torch.no_grad()`, eval mode and `adapters_disabled(model, ["default"])` (train_dpo.py's reference_logps),
or with +precompute given as stored numbers (train_dpo.py --precompute-ref: a tensor built from Python floats
each step, no reference forward); dpo_loss (sigmoid), backward, dpo_metrics stacked, clip_grad_norm_ 1.0 over the
adapter weights, fused AdamW, and the script's host syncs (metrics .tolist(), float(grad_norm)).

Case spec: BASE (fp32 | bf16), then any of +precompute, +drop0 (LoRA dropout 0, train_dpo.py's default; the
peer uses 0.05), +compile (torch.compile(model) for the policy forward, as train_dpo.py --compile), +ckpt
(activation checkpointing), +adapterbf16, +real (UltraFeedback-like ragged lengths, common.UF_*_HIST (assumed
shapes), prompt cut to --prompt-len and pairs to prompt + response lengths, right-padded as train_dpo.py does;
also reports real_tokens_per_s; the issue's real-shape case is `bf16+real` and `bf16+precompute+real` with
--lora-r 16 --lora-alpha 32 --prompt-len 512 --response-len 512). BASE fp32 is what train_dpo.py does today (load_model in fp32, autocast).
BASE bf16 is the frozen base cast to bf16 before add_lora; nanoalign/lora.py creates adapters in the base weight's
dtype, so the bench then casts the adapters back to fp32 (PEFT's autocast_adapter_dtype does the same, and the
peer's model is bf16 too); +adapterbf16 keeps them bf16 as lora.py made them. Reported: pairs_per_s (pairs / median
step), tokens_per_s (2 * pairs * (prompt + response) / step), peak_gib (max_memory_allocated after the model was
built). Goal: >= 2.5x TRL+PEFT pairs/s at <= its peak memory.
"""
import torch

import common
from nanoalign.lora import LoRAAdapter, adapters_disabled, add_lora, trainable_parameters
from nanoalign.losses import dpo_loss, dpo_metrics, sequence_logps
from nanoalign.train import autocast, make_optimizer


def parse_case(spec, args):
    parts = spec.strip().split("+")
    base = parts[0] or ("bf16" if args.bf16_base else "fp32")
    if base not in ("fp32", "bf16"):
        raise ValueError(f"case {spec!r}: base must be fp32 or bf16")
    c = dict(base=base, precompute=args.precompute_ref, dropout=args.lora_dropout, compile=args.compile,
             ckpt=args.grad_ckpt, adapter_bf16=False, real=False)
    for mod in parts[1:]:
        if mod == "precompute":
            c["precompute"] = True
        elif mod == "drop0":
            c["dropout"] = 0.0
        elif mod == "compile":
            c["compile"] = True
        elif mod == "ckpt":
            c["ckpt"] = True
        elif mod == "adapterbf16":
            c["adapter_bf16"] = True
        elif mod == "real":
            c["real"] = True
        else:
            raise ValueError(f"unknown case modifier {mod!r} in {spec!r}")
    return c


def case_name(c):
    return (f"ours_dpo_lora_{c['base']}base" + ("_precompute_ref" if c["precompute"] else "")
            + ("_adapterbf16" if c["adapter_bf16"] else "") + (f"_drop{c['dropout']:g}" if c["dropout"] != 0.05 else "")
            + ("_ckpt" if c["ckpt"] else "") + ("_compile" if c["compile"] else "") + ("_real" if c["real"] else ""))


def real_pairs(b, config, max_len, max_prompt_len, seed=0):
    """b pairs with UltraFeedback-like prompt / response lengths, cut like data.preference_examples:
    input_ids [2b, t], loss_mask [2b, t], and the number of real (non-pad) tokens."""
    from nanoalign.data import preference_batch
    prompts = common.sample_lengths(common.UF_PROMPT_HIST, b, seed, cap=max_prompt_len)
    responses = common.sample_lengths(common.UF_RESPONSE_HIST, 2 * b, seed + 1)
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(0, common.token_high(config), (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt": tok(p), "chosen": tok(min(responses[2 * j], max_len - p)),
              "rejected": tok(min(responses[2 * j + 1], max_len - p))} for j, p in enumerate(prompts)]
    real = sum(2 * len(x["prompt"]) + len(x["chosen"]) + len(x["rejected"]) for x in pairs)
    return (*preference_batch(pairs, common.pad_id(config)), real)


def run(c, args, config):
    device, b = args.device, args.pairs
    common.reset_memory(device)
    dtype = torch.bfloat16 if c["base"] == "bf16" else torch.float32
    model = common.build_causal_lm(config, device, dtype)
    add_lora(model, "default", r=args.lora_r, alpha=args.lora_alpha, dropout=c["dropout"])
    adapter_dtype = next(m for m in model.modules() if isinstance(m, LoRAAdapter)).lora_A.weight.dtype
    if dtype != torch.float32 and not c["adapter_bf16"]:
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.float()  # fp32 adapter weights and AdamW state on the bf16 base
    model.gradient_checkpointing = c["ckpt"]
    model.train()
    optimizer = make_optimizer(model, lr=5e-6, weight_decay=0.0)
    forward = torch.compile(model) if c["compile"] else model
    lm_head = model.lm_head.weight
    common.reset_peak(device)

    # [2b, t]: rows 0..b-1 prompt + chosen, b..2b-1 prompt + rejected (preference_batch's layout), all full length
    g = torch.Generator(device=device).manual_seed(0)
    t = args.prompt_len + args.response_len
    if c["real"]:  # UltraFeedback-like ragged lengths (common.UF_*_HIST, assumed), right-padded as train_dpo.py does
        ids, mask, real = real_pairs(b, config, t, args.prompt_len)
        ids, mask = ids.to(device), mask.to(device)
        t = ids.shape[1]
    else:
        ids = torch.randint(0, common.token_high(config), (2 * b, t), device=device, generator=g)
        ids[b:, :args.prompt_len] = ids[:b, :args.prompt_len]  # the same prompt under both responses
        mask = torch.zeros_like(ids)
        mask[:, args.prompt_len:] = 1
        real = ids.numel()

    @torch.no_grad()
    def reference_logps():  # train_dpo.py's reference_logps without a --ref model
        was_training = model.training
        model.eval()
        with autocast(device, "bf16"), adapters_disabled(model, ["default"]):
            out = sequence_logps(model(ids, return_hidden=True), lm_head, ids, mask, args.chunk_size)
        model.train(was_training)
        return out.float()

    ref_cache = None
    if c["precompute"]:  # computed once before training, stored as Python floats (chosen, rejected) per pair
        r = reference_logps().tolist()
        ref_cache = [(r[j], r[b + j]) for j in range(b)]
    state = {}

    def step():
        with autocast(device, "bf16"):
            policy = sequence_logps(forward(ids, return_hidden=True), lm_head, ids, mask, args.chunk_size)  # [2b]
            if ref_cache is not None:
                ref = torch.tensor(ref_cache, device=device).T.reshape(-1)
            else:
                ref = reference_logps()
            losses, cr, rr = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], args.beta)
            loss = losses.sum() / b
        loss.backward()
        m = dpo_metrics(losses.detach(), cr, rr, policy[:b].detach(), policy[b:].detach())
        row = torch.stack([v.float() for v in m.values()]) * b
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["metrics"], state["grad_norm"] = row.tolist(), float(grad_norm)

    times = common.time_steps(step, device, args.warmup, args.steps)
    s = common.summarize(times)
    out = dict(case=case_name(c), pairs=b, prompt_len=args.prompt_len, response_len=args.response_len,
               base_dtype=str(dtype).removeprefix("torch."), adapter_dtype_from_lora_py=str(adapter_dtype).removeprefix("torch."),
               adapter_dtype=str(next(iter(trainable_parameters(model))).dtype).removeprefix("torch."),
               lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=c["dropout"], precompute_ref=c["precompute"],
               grad_ckpt=c["ckpt"], compile=c["compile"], **s, pairs_per_s=b / s["step_s"],
               tokens_per_s=2 * b * t / s["step_s"], real_tokens_per_s=real / s["step_s"], padded_len=t,
               peak_gib=common.peak_gib(device),
               loss=state["metrics"][0] / b, grad_norm=state["grad_norm"])
    del model, optimizer, forward
    return out


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05, help="the peer's value (train_dpo.py defaults to 0)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--precompute-ref", action="store_true", help="default for every case: reference log-probs given")
    p.add_argument("--bf16-base", action="store_true", help="default base for a case spec with no base")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--chunk-size", type=int, default=1024)
    args = common.setup(p.parse_args(), warmup=5, steps=10, tiny_warmup=1, tiny_steps=2)
    config = common.model_config(common.TINY if args.tiny else common.QWEN05)
    if args.tiny:
        args.pairs, args.prompt_len, args.response_len = 2, 16, 32
        args.chunk_size = min(args.chunk_size, 48)
        specs = args.cases or "fp32,fp32+precompute,bf16,bf16+precompute+drop0"
    else:
        specs = args.cases or ("bf16" if args.bf16_base else "fp32")
    print(common.env_line(), flush=True)
    cases = [parse_case(s, args) for s in specs.split(",") if s.strip()]
    common.run_cases([(case_name(c), lambda c=c: run(c, args, config)) for c in cases], args)


if __name__ == "__main__":
    main()
