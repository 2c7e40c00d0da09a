"""Full fine-tune SFT step of nanoalign at Qwen2.5-0.5B shapes (random weights): tokens/s, MFU, peak memory.

    python bench/bench_sft.py                                     # one case: 8 x 1024 tokens, eager
    python bench/bench_sft.py --cases 1024x8,2048x8,2048x8+ckpt   # what bench/run_all.sh runs first
    python bench/bench_sft.py --cases 1024x8+compile,2048x8+ckpt+compile
    python bench/bench_sft.py --tiny                              # CPU smoke test (tiny config, 3 steps)

A step is train_sft.py's (grad_accum 1, one process): fp32 master weights, bf16 autocast, the model called with
return_hidden=True, nanoalign.losses.sft_loss on the hidden states (chunked lm_head + log-softmax), backward,
clip_grad_norm_ 1.0, fused AdamW (nanoalign.train.make_optimizer), zero_grad, and the same host syncs as the
script (the trained-token count, loss.item(), float(grad_norm)). Batch: random token ids, loss mask = every token
but the first --prompt-len (200) as the "prompt", so 824 of each 1024 positions are trained; the peer (TRL)
trains all 1024, so compare tokens/s (positions per second), not loss work.

Real-shape case: `real` (+nopack, +flex, +varlen, +ckpt, +compile): conversations with smol-smoltalk-like
lengths (common.SMOLTALK_HIST, assumed shape; over SEQ dropped as train_sft.py does), 30% of each untrained
as the prompt, a token budget of SEQ x BATCH per step (default 2048 x 8). Packed (train_sft.py's default): the
conversations best-fit into BATCH rows of SEQ (data.pack, document-masked attention, `--pack-attn` sdpa unless
+flex/+varlen). +nopack: the same conversations sorted by length and cut into micro-batches of BATCH, each padded
to its longest (ideal length bucketing), accumulated into one step. Reports real_tokens_per_s (no pads),
trained_tokens_per_s (assistant tokens), mfu_real (6N + attention at each conversation's own length, real tokens
only), peak_gib.

Case spec: SEQxBATCH, then any of +ckpt (activation checkpointing), +compile (torch.compile(model) as
train_sft.py --compile does), +chunkN (rows per lm_head chunk). --compile / --grad-ckpt / --chunk-size set the
defaults for every case. Reported: step_s (median of --steps after --warmup), tokens_per_s (= batch * seq /
step_s), mfu (6N + 12·L·d·T per token, nanoalign.model.flops_per_token, over the GPU's peak dense bf16 FLOP/s),
mfu_6n (the peer's 6N-only convention), peak_gib (torch.cuda.max_memory_allocated: weights + grads + AdamW state
+ activations). Goals (see bench/RESULTS.md): >= 2x TRL tokens/s, >= 40% MFU, <= 0.85x TRL peak memory at
1024x8; <= 22 GiB at 2048x8 (the RTX 4090 goal; measured here on whatever GPU runs it).
"""
import torch

import common
from nanoalign.losses import sft_loss
from nanoalign.train import autocast, make_optimizer


def parse_case(spec, args):
    parts = spec.strip().split("+")
    seq, _, bs = parts[0].partition("x")
    case = dict(seq=int(seq), bs=int(bs or args.batch_size), ckpt=args.grad_ckpt, compile=args.compile,
                chunk=args.chunk_size)
    for mod in parts[1:]:
        if mod == "ckpt":
            case["ckpt"] = True
        elif mod == "compile":
            case["compile"] = True
        elif mod.startswith("chunk"):
            case["chunk"] = int(mod[len("chunk"):])
        else:
            raise ValueError(f"unknown case modifier {mod!r} in {spec!r} (ckpt, compile, chunkN)")
    return case


def case_name(c):
    return (f"ours_sft_full_{c['seq']}x{c['bs']}" + ("_ckpt" if c["ckpt"] else "") + ("_compile" if c["compile"] else "")
            + (f"_chunk{c['chunk']}" if c["chunk"] != 1024 else ""))


def run(c, args, config):
    device = args.device
    common.reset_memory(device)
    model = common.build_causal_lm(config, device, torch.float32)
    model.gradient_checkpointing = c["ckpt"]
    model.train()
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.0)  # fused AdamW on CUDA, as train_sft.py
    forward = torch.compile(model) if c["compile"] else model
    lm_head = model.lm_head.weight

    prompt_len = min(args.prompt_len, c["seq"] // 4)
    g = torch.Generator(device=device).manual_seed(0)
    batches = []
    for _ in range(2):  # two batches, alternated
        ids = torch.randint(0, common.token_high(config), (c["bs"], c["seq"]), device=device, generator=g)
        mask = torch.ones_like(ids)
        mask[:, :prompt_len] = 0
        batches.append((ids, mask))
    state = dict(i=0, loss=None)

    def step():
        ids, mask = batches[state["i"] % 2]
        state["i"] += 1
        num_tokens = int(mask[:, 1:].sum())  # train_sft.py's step_tokens: a host sync there too
        with autocast(device, "bf16"):
            hidden = forward(ids, return_hidden=True)
            loss = sft_loss(hidden, lm_head, ids, mask, num_tokens=num_tokens, chunk_size=c["chunk"])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["loss"], state["grad_norm"] = loss.item(), float(grad_norm)  # the loop logs both

    times = common.time_steps(step, device, args.warmup, args.steps)
    s = common.summarize(times)
    tokens = c["bs"] * c["seq"]
    tps = tokens / s["step_s"]
    out = dict(case=case_name(c), batch=c["bs"], seq=c["seq"], prompt_len=prompt_len, grad_ckpt=c["ckpt"],
               compile=c["compile"], chunk_size=c["chunk"], **s, tokens_per_s=tps,
               trained_tokens_per_s=c["bs"] * (c["seq"] - prompt_len) / s["step_s"],
               **common.mfu(config, model, c["seq"], tps, device, args.peak_tflops),
               peak_gib=common.peak_gib(device), loss=state["loss"], grad_norm=state["grad_norm"])
    if c["seq"] >= 2048 and out["peak_gib"] is not None:
        out["goal_4090_22gib"] = out["peak_gib"] <= 22.0
    del model, optimizer, forward, batches
    return out


def run_real(spec, args, config):
    """The real-shape SFT case (see the docstring): same conversations packed or padded."""
    from nanoalign.data import pack, packed_batch, pad_right
    mods = spec.split("+")[1:]
    seq, bs, device = args.seq_len, args.batch_size, args.device
    lengths = [n for n in common.sample_lengths(common.SMOLTALK_HIST, 50 * bs * seq // 900 + 50, seed=1) if n <= seq]
    rows = pack(lengths, seq, seed=0)
    rows = sorted(rows, key=lambda r: -sum(lengths[i] for i in r))[:bs]  # the fullest BATCH rows: one step's budget
    chosen = [i for r in rows for i in r]
    g = torch.Generator().manual_seed(0)
    examples = {}
    for i in chosen:
        prompt = max(1, int(0.3 * lengths[i]))
        examples[i] = {"ids": torch.randint(0, common.token_high(config), (lengths[i],), generator=g).tolist(),
                       "mask": [0] * prompt + [1] * (lengths[i] - prompt)}
    if "nopack" in mods:
        order = sorted(chosen, key=lambda i: lengths[i])
        micro = [(pad_right([examples[i]["ids"] for i in order[k:k + bs]], common.pad_id(config)),
                  pad_right([examples[i]["mask"] for i in order[k:k + bs]], 0), None) for k in range(0, len(order), bs)]
    else:
        micro = [packed_batch(examples, rows, seq, common.pad_id(config))]
    micro = [tuple(x.to(device) if x is not None else None for x in m) for m in micro]
    impl = "flex" if "flex" in mods else "varlen" if "varlen" in mods else "sdpa"
    common.reset_memory(device)
    model = common.build_causal_lm(config, device, torch.float32)
    model.gradient_checkpointing = "ckpt" in mods
    model.model.packed_attention = impl
    model.train()
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.0)
    forward = torch.compile(model) if "compile" in mods else model
    num_tokens = sum(int(m[:, 1:].sum()) for _, m, _ in micro)

    def step():
        for ids, mask, docs in micro:
            with autocast(device, "bf16"):
                hidden = forward(ids, return_hidden=True, document_ids=docs)
                loss = sft_loss(hidden, model.lm_head.weight, ids, mask, num_tokens=num_tokens, chunk_size=args.chunk_size)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    s = common.summarize(common.time_steps(step, device, args.warmup, args.steps))
    real = sum(lengths[i] for i in chosen)
    positions = sum(ids.numel() for ids, _, _ in micro)
    mean_len = sum(lengths[i] ** 2 for i in chosen) / real  # token-weighted: each token attends within its own conversation
    m = common.mfu(config, model, mean_len, real / s["step_s"], device, args.peak_tflops)
    name = "ours_sft_real_" + ("padded" if "nopack" in mods else f"packed_{impl}") + "".join(
        f"_{x}" for x in mods if x in ("ckpt", "compile"))
    return dict(case=name, seq=seq, rows_or_batch=bs, conversations=len(chosen), real_tokens=real, positions=positions,
                fill=real / positions, micro_batches=len(micro), **s, real_tokens_per_s=real / s["step_s"],
                trained_tokens_per_s=num_tokens / s["step_s"], mfu_real=m["mfu"], peak_gib=common.peak_gib(device))


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024, help="default sequence length (the real cases: use 2048)")
    p.add_argument("--prompt-len", type=int, default=200, help="untrained leading tokens of each row")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the lm_head + loss")
    args = common.setup(p.parse_args(), warmup=5, steps=10, tiny_warmup=1, tiny_steps=2)
    config = common.model_config(common.TINY if args.tiny else common.QWEN05)
    if args.tiny:
        args.prompt_len = min(args.prompt_len, 16)
        args.chunk_size = min(args.chunk_size, 48)  # several chunks per batch, like the real run
        specs = args.cases or "64x2,64x2+ckpt,real,real+nopack"
        args.seq_len = min(args.seq_len, 256)  # real cases: rows of 256, conversations up to 256 tokens
    else:
        specs = args.cases or f"{args.seq_len}x{args.batch_size}"
    print(common.env_line(), flush=True)
    specs = [s.strip() for s in specs.split(",") if s.strip()]
    cases = [(s, lambda s=s: run_real(s, args, config)) if s.startswith("real") else
             (case_name(c := parse_case(s, args)), lambda c=c: run(c, args, config)) for s in specs]
    common.run_cases(cases, args)


if __name__ == "__main__":
    main()
