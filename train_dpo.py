"""DPO with LoRA on preference pairs; the model under the adapter is the reference, for free.

One GPU or CPU:
    python train_dpo.py --model runs/sft/final --data HuggingFaceH4/ultrafeedback_binarized --data-split train_prefs --out runs/dpo
Three GPUs:
    torchrun --nproc_per_node=3 train_dpo.py --model runs/sft/final --data HuggingFaceH4/ultrafeedback_binarized \
        --data-split train_prefs --out runs/dpo
A second round on synthetic pairs, a new adapter stacked on the first (frozen):
    python train_dpo.py --model runs/sft/final --adapter runs/dpo/final --data runs/synth/pairs.jsonl --out runs/dpo2

Policy = --model + earlier adapters (frozen) + a new LoRA adapter. Reference = the same model with only the new adapter
switched off (no second copy in memory), or a separate --ref model, or log-probs precomputed once (--precompute-ref)
so a step needs no reference forward at all. Writes <out>/metrics.jsonl, <out>/ckpt-<step>/ (the newest
--keep-checkpoints of them are kept), <out>/final/ (the new adapter in PEFT layout) and, with --merge, <out>/merged/
(an HF model dir with every adapter folded in). One run at a time per --out (<out>/.lock); <out>/run_settings.json
records the settings a rerun or --resume must share.
"""
import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.data import (holdout_and_mix, packed_preference_batch, preference_batch, preference_examples,
                            read_records, shard, step_batches)
from nanoalign.errors import InputError
from nanoalign.lora import adapters_disabled, add_lora, describe, load_adapter, load_merged, save_adapter
from nanoalign.losses import dpo_loss, dpo_metrics, response_lengths, sequence_logps
from nanoalign.model import check_vocab, load_model, resolve_model_dir, save_model
from nanoalign.report import REPORT_TO, open_tracker, require_backend, write_model_card
from nanoalign.rundir import (add_flags, check_settings, checkpoint, lock_out_dir, settings_from, torch_load_or_none,
                              torch_save, write_text)
from nanoalign.train import (DTYPES, DivergenceGuard, MetricsLog, Number, Progress, Weights, all_reduce_sum, autocast,
                             beta_at, check_finite_weights, choose_precision, cleanup_distributed, fraction,
                             load_train_state, lr_at, make_optimizer, make_scaler, maybe_no_sync, nonneg_float,
                             nonneg_int, one_line_errors, optimizer_step, positive_float, positive_int, print0,
                             random_seed, rate, resolve_resume, save_train_state, set_lr, setup_distributed, track,
                             wrap_ddp, zero_to_one)


# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="the SFT model: HF dir or hub id")
parser.add_argument("--adapter", action="append", default=[], help="earlier LoRA adapter(s) to stack under the new one, frozen (repeatable, in order)")
parser.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: --model)")
parser.add_argument("--data", action="append", required=True, help="preference source: file, dir or hub id (repeatable)")
parser.add_argument("--data-weights", default=None, type=Weights(),
                    help="comma-separated mixing weights >= 0 (not all 0), one per --data (default all 1)")
parser.add_argument("--data-split", default="train")
parser.add_argument("--data-config", default=None)
parser.add_argument("--out", required=True)
parser.add_argument("--max-len", type=positive_int, default=1024, help="longest prompt + response in tokens")
parser.add_argument("--max-prompt-len", type=positive_int, default=None,
                    help="prompts keep their last this-many tokens (default: half of --max-len)")
parser.add_argument("--eval-frac", type=fraction, default=0.02, help="share of each source held out, in [0, 1)")
parser.add_argument("--beta", type=positive_float, default=0.1)
parser.add_argument("--beta-warmup-steps", type=nonneg_int, default=0, help="ramp beta linearly from beta/N to beta over the first N steps")
parser.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], default="sigmoid",
                    help="sigmoid: DPO; ipo: IPO on per-token log-ratios (each answer's summed log-ratio divided by "
                         "its response tokens, as TRL does); hinge: SLiC")
parser.add_argument("--label-smoothing", type=Number(0, 0.5, hi_open=True), default=0.0,
                    help="conservative DPO (sigmoid only): the share of pairs taken as mislabelled, in [0, 0.5)")
parser.add_argument("--length-penalty", type=nonneg_float, default=0.0,
                    help="R-DPO's alpha (Park et al. 2024): -log sigmoid(beta * margin + alpha * (|y_w| - |y_l|)), "
                         "lengths in response tokens, alpha not scaled by beta; sigmoid only; 0 = off")
parser.add_argument("--margin-clamp", type=nonneg_float, default=0.0,
                    help="clamp the DPO margin (log-ratio difference, before beta) to [-C, C]; 0 = off")
parser.add_argument("--sft-weight", type=nonneg_float, default=0.0, help="add this x NLL of the chosen responses (keeps chosen log-probs up)")
parser.add_argument("--ref", default=None, help="a separate reference model (default: --model + --adapter, new adapter off)")
parser.add_argument("--precompute-ref", action="store_true",
                    help="compute the reference log-probs of the pairs this run uses once, before training, into "
                         "<out>/ref_logps.pt (a later run with the same reference reuses it and adds what it lacks)")
parser.add_argument("--lora-r", type=positive_int, default=8)
parser.add_argument("--lora-alpha", type=positive_float, default=16, help="the adapter's output is scaled by alpha / r")
parser.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the adapter's input, in [0, 1)")
parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
parser.add_argument("--batch-size", type=positive_int, default=4, help="pairs per micro-batch per rank")
parser.add_argument("--grad-accum", type=positive_int, default=1)
parser.add_argument("--epochs", type=positive_float, default=1.0)
parser.add_argument("--max-steps", type=nonneg_int, default=0)
parser.add_argument("--lr", type=positive_float, default=5e-5)
parser.add_argument("--min-lr-ratio", type=zero_to_one, default=0.0, help="the LR decays to lr x this, in [0, 1]")
parser.add_argument("--schedule", choices=["cosine", "linear", "constant", "step"], default="cosine",
                    help="step: lr x --lr-step-gamma every --lr-step-every epochs (StepLR)")
parser.add_argument("--lr-step-every", type=positive_float, default=0.2,
                    help="--schedule step: epochs between lr drops")
parser.add_argument("--lr-step-gamma", type=Number(0, 1, lo_open=True), default=0.5,
                    help="--schedule step: lr factor at each drop, in (0, 1]")
parser.add_argument("--warmup-steps", type=nonneg_int, default=0)
parser.add_argument("--weight-decay", type=nonneg_float, default=0.0)
parser.add_argument("--clip", type=nonneg_float, default=1.0)
parser.add_argument("--max-bad-steps", type=nonneg_int, default=3,
                    help="stop after this many steps in a row with a non-finite loss or gradient norm, each skipped "
                         "(0 = never stop; fp16 overflows the GradScaler skips do not count)")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="autocast dtype (default: bf16 on a CUDA GPU that supports it, else fp32)")
parser.add_argument("--base-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="dtype of the frozen base (auto: bf16 under bf16 autocast; adapters always train in fp32)")
parser.add_argument("--grad-ckpt", action="store_true")
parser.add_argument("--compile", action="store_true")
parser.add_argument("--pack", action="store_true",
                    help="pack the chosen and rejected sequences of a micro-batch into rows of --max-len (each "
                         "attending only to itself): no padding but each row's end, the same log-probs")
parser.add_argument("--chunk-size", type=positive_int, default=1024, help="rows per chunk of the lm_head + log-probs")
parser.add_argument("--eval-every", type=nonneg_int, default=100)
parser.add_argument("--save-every", type=nonneg_int, default=500)
add_flags(parser, "Each holds only the new adapter and its two fp32 AdamW moments, saved once whatever the number "
                  "of ranks: 12 bytes an adapter parameter (Qwen2.5-0.5B at r 8: 53 MB; 7B: 0.24 GB)")
parser.add_argument("--merge", action="store_true", help="also write <out>/merged, an HF model dir with adapters folded in")
parser.add_argument("--report-to", choices=REPORT_TO, default="none",
                    help="also send metrics to TensorBoard (<out>/tensorboard) or W&B; metrics.jsonl is always written")
parser.add_argument("--seed", type=random_seed, default=0, help="an integer in [0, 2^63 - 1]")
parser.add_argument("--device", default=None)
# flags that do not change what is computed, free to change between runs (README "Runs that survive"): every other
# one is recorded in <out>/run_settings.json
FREE = ["out", "precompute_ref", "max_bad_steps", "grad_ckpt", "compile", "pack", "chunk_size", "eval_every",
        "save_every", "keep_checkpoints", "resume", "overwrite", "merge", "report_to", "device"]
args = parser.parse_args()
one_line_errors()
if args.max_prompt_len is None:
    args.max_prompt_len = args.max_len // 2
if not 0 < args.max_prompt_len < args.max_len:
    raise InputError(f"--max-prompt-len {args.max_prompt_len} must be below --max-len {args.max_len} "
                     f"(responses need room too)")
if args.data_weights and len(args.data_weights) != len(args.data):
    raise InputError(f"--data-weights has {len(args.data_weights)} values for {len(args.data)} --data sources")
if args.label_smoothing and args.loss_type != "sigmoid":
    raise InputError("--label-smoothing needs --loss-type sigmoid")
if args.length_penalty and args.loss_type != "sigmoid":
    raise InputError("--length-penalty needs --loss-type sigmoid")
# -----------------------------------------------------------------------------

require_backend(args.report_to)  # before any work
d = setup_distributed(args.device)
args.precision = choose_precision(args.precision, d.device)
torch.manual_seed(args.seed + d.rank)
out = Path(args.out)
lock_out_dir(out, d.device)
# every other flag defines the results: recorded, and a rerun or --resume with another value stops (README "Runs that
# survive"); the global batch is recorded, not its split, and a constant LR does not depend on the run's length
check_settings(out, settings_from(
    args, FREE, unused=([] if args.schedule == "step" else ["lr_step_every", "lr_step_gamma"])
    + (["max_steps", "epochs"] if args.schedule == "constant" else ["epochs"] if args.max_steps else ["max_steps"]),
    files=["model", "adapter", "tokenizer", "data", "ref"],  # also recorded by what is at their paths
    **{"global batch (--batch-size x --grad-accum x ranks)": args.batch_size * args.grad_accum * d.world}),
    args.overwrite, keep=["ref_logps.pt"], resume=args.resume)  # ref_logps.pt: reused while its fingerprint holds
tracker = open_tracker(args.report_to, args.out, vars(args), d.is_main)
resume_dir = resolve_resume(args.resume, out)  # checked now, before any work
model_dir = resolve_model_dir(args.model)
tokenizer_dir = resolve_model_dir(args.tokenizer) if args.tokenizer else model_dir
chat = load_chat(tokenizer_dir)  # the default system prompt is the one of the dir's own chat template

# data: every source rendered and truncated the same way, then mixed, split, and cut into world-invariant steps
sources = []
for source in args.data:
    records = track(read_records(source, args.data_split, args.data_config), "tokenise", d.is_main)
    examples, stats = preference_examples(records, chat, args.max_len, args.max_prompt_len)
    print0(f"{source}: {stats}")
    sources.append(examples)
weights = args.data_weights or [1.0] * len(sources)
data_rows = [(source + (f" (weight {w:g})" if w != 1 else ""), len(examples))  # pairs kept, for the model card
             for source, w, examples in zip(args.data, weights, sources)]
# held out per source before mixing, so an upsampled source's eval pairs have no copies in train
train_set, eval_pairs = holdout_and_mix(sources, weights, args.eval_frac, args.seed)
eval_set = shard(eval_pairs, d.rank, d.world)  # uneven shares: the eval covers every held-out pair
global_pairs = args.batch_size * args.grad_accum * d.world
steps_per_epoch = len(train_set) // global_pairs
if steps_per_epoch == 0:
    raise InputError(f"{len(train_set)} pairs are fewer than one global batch "
                     f"(--batch-size x --grad-accum x world size)")
total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
print0(f"{len(train_set)} train / {len(eval_pairs)} eval pairs; {total_steps} steps")

# policy: base + frozen earlier adapters + the new trainable one
# the base is frozen, so it needs no fp32 master copy: in bf16 it takes half the memory and autocast stops re-casting
# every weight on every forward
base_dtype = DTYPES["bf16" if args.base_dtype == "auto" and args.precision == "bf16" else
                    "fp32" if args.base_dtype == "auto" else args.base_dtype]
model = load_model(model_dir, dtype=base_dtype, device=d.device)
check_vocab(chat.vocab_size, model.config, args.tokenizer or args.model, args.model)
for i, path in enumerate(args.adapter):
    load_adapter(model, path, name=f"round{i}", trainable=False)
if resume_dir:
    load_adapter(model, resume_dir, name="default", trainable=True)
else:
    add_lora(model, "default", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
             targets=args.lora_targets.split(","))
print0(describe(model))
model.gradient_checkpointing = args.grad_ckpt
# frozen: no gradients, no activations kept for backward (it ran under autograd and filled .grad before)
ref_model = load_model(args.ref, dtype=base_dtype, device=d.device).requires_grad_(False) if args.ref else None
lm_head = model.lm_head.weight


@torch.no_grad()
def batch_tensors(batch):
    """(ids, mask, packing) of a list of pairs on the device: preference_batch's padded [2b, t] rows, or with
    --pack the 2b sequences packed into rows (packing = (document_ids, sequence_ids), else None)."""
    if args.pack:
        ids, mask, docs, seqs = (t.to(d.device) for t in packed_preference_batch(batch, args.max_len, chat.pad_id))
        return ids, mask, (docs, seqs)
    ids, mask = (t.to(d.device) for t in preference_batch(batch, chat.pad_id))
    return ids, mask, None


def batch_logps(forward, weight, ids, mask, packing):
    """Summed response log-probs of the 2b sequences (chosen rows, then rejected rows): [2b]."""
    if packing is None:
        return sequence_logps(forward(ids, return_hidden=True), weight, ids, mask, args.chunk_size)
    docs, seqs = packing
    return sequence_logps(forward(ids, return_hidden=True, document_ids=docs), weight, ids, mask, args.chunk_size,
                          sequence_ids=seqs, num_sequences=int(seqs.max()) + 1)


def batch_lengths(mask, packing):
    """Response tokens of the 2b sequences, in batch_logps' order: [2b]."""
    if packing is None:
        return response_lengths(mask)
    seqs = packing[1]
    return response_lengths(mask, seqs, int(seqs.max()) + 1)


@torch.no_grad()
def reference_logps(ids, mask, packing=None):
    """Summed response log-probs under the reference: eval mode, no grad, new adapter off (PITFALLS #4, #9)."""
    was_training = model.training
    model.eval()
    with autocast(d.device, args.precision):
        if ref_model is not None:
            out_logps = batch_logps(ref_model, ref_model.lm_head.weight, ids, mask, packing)
        else:
            with adapters_disabled(model, ["default"]):
                out_logps = batch_logps(model, lm_head, ids, mask, packing)
    model.train(was_training)
    return out_logps.float()


def pair_key(ex):
    return hashlib.sha1(json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]]).encode()).hexdigest()


def weights_stamp(path):
    """(name, size, mtime) of each weight file of a model or adapter dir: a retrained checkpoint changes it."""
    files = sorted(resolve_model_dir(path).glob("*.safetensors"))
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def pair_length(ex):
    return len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"]))


def used_pairs(start_step):
    """The pairs this run will see: every rank's share of the global batches of steps start_step..total_steps-1
    (cut as the training loop cuts them), then the whole eval split."""
    global_batches = step_batches([pair_length(ex) for ex in train_set], global_pairs, 1, 0, 1, args.seed, start_step)
    return [train_set[i] for _ in range(start_step, total_steps) for i in next(global_batches)[0]] + eval_pairs


def precompute_reference(examples, path, save_every_s=600):
    """Reference log-probs of `examples` (chosen, rejected), keyed by token ids, in a cache file that later runs with
    the same reference reuse and extend: only pairs missing from it are computed, longest first (a batch holds similar
    lengths, and an out-of-memory shows at once), spread over the ranks. Rank 0 saves what it has every
    save_every_s, so a killed precompute loses little."""
    fingerprint = dict(model=str(model_dir.resolve()), adapters=[str(Path(a).resolve()) for a in args.adapter],
                       ref=args.ref, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
                       precision=args.precision, base_dtype=str(base_dtype), weights=[weights_stamp(p) for p in
                                                          [model_dir, *args.adapter, *([args.ref] if args.ref else [])]])
    logps = {}
    cached = torch_load_or_none(path, keys=("fingerprint", "logps"))  # None when missing, torn or damaged: recomputed
    if cached is not None and cached["fingerprint"] == fingerprint:
        logps = cached["logps"]
    elif cached is not None:
        print0(f"{path} is stale (other model, settings or weights): recomputing")
    todo = sorted({pair_key(ex): ex for ex in examples if pair_key(ex) not in logps}.values(), key=pair_length,
                  reverse=True)
    print0(f"reference log-probs: {len({pair_key(ex) for ex in examples})} pairs used, {len(todo)} to compute, "
           f"the rest from {path}")

    def save(entries):
        torch_save({"fingerprint": fingerprint, "logps": entries}, path)

    mine, fresh, tokens, t0, saved = todo[d.rank::d.world], {}, 0, time.time(), time.time()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(mine), "reference", d.is_main, unit="pairs")
    for i in range(0, len(mine), args.batch_size * 2):
        batch = mine[i:i + args.batch_size * 2]
        ref = reference_logps(*batch_tensors(batch)).tolist()  # [2b]: chosen rows, then rejected rows
        for j, ex in enumerate(batch):
            fresh[pair_key(ex)] = (ref[j], ref[len(batch) + j])
        tokens += sum(len(ex["prompt"]) * 2 + len(ex["chosen"]) + len(ex["rejected"]) for ex in batch)
        progress.update(len(batch), rate(tokens, time.time() - t0, "tok"))
        if d.is_main and time.time() - saved > save_every_s:
            save({**logps, **fresh})
            saved = time.time()
    progress.close()
    if d.world > 1:
        gathered = [None] * d.world
        torch.distributed.all_gather_object(gathered, fresh)
        fresh = {k: v for part in gathered for k, v in part.items()}
        tokens = all_reduce_sum(tokens, d.device)
    if todo:
        dt = time.time() - t0
        print0(f"reference log-probs of {len(todo)} pairs ({int(tokens)} tokens) in {dt:.1f} s: "
               f"{tokens / dt:.0f} tokens/s")
        if d.is_main:
            save({**logps, **fresh})
    return {**logps, **fresh}


METRICS = list(dpo_metrics(*torch.zeros(5, 1)))  # the logged names, in order


def dpo_forward(forward, ids, mask, batch, beta, packing=None):
    """One forward for chosen and rejected together ([2b, t], or packed rows), then the DPO loss per pair."""
    b = len(batch)
    policy = batch_logps(forward, lm_head, ids, mask, packing)  # [2b]
    if ref_cache is not None:
        ref = torch.tensor([ref_cache[pair_key(ex)] for ex in batch], device=ids.device).T.reshape(-1)
    else:
        ref = reference_logps(ids, mask, packing)
    lengths = batch_lengths(mask, packing)  # the cache holds sums: ipo's per-token log-ratios divide them here
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta,
                                                        args.loss_type, args.label_smoothing, args.margin_clamp,
                                                        lengths[:b], lengths[b:], args.length_penalty)
    return policy, losses, chosen_rewards, rejected_rewards


model.train()
optimizer = make_optimizer(model, args.lr, args.weight_decay)
scaler = make_scaler(d.device, args.precision)
step = 0
if resume_dir:
    step = load_train_state(resume_dir, optimizer, scaler)["step"]
    print0(f"resumed from {resume_dir} at step {step}")
# every rank passes the same pairs (all eval pairs, not its shard) and reads the same file, so all agree on what is
# missing; each computes a share of it and all_gather_object gives every rank all of it
ref_cache = precompute_reference(used_pairs(step), out / "ref_logps.pt") if args.precompute_ref else None
ddp_model = wrap_ddp(torch.compile(model) if args.compile else model, d)


@torch.no_grad()
def evaluate(beta):
    """Mean metrics over every held-out pair: per-rank sums (a rank may have no pairs) over the global count."""
    model.eval()
    sums = torch.zeros(len(METRICS), dtype=torch.float64, device=d.device)
    for i in range(0, len(eval_set), args.batch_size):
        batch = eval_set[i:i + args.batch_size]
        ids, mask, packing = batch_tensors(batch)
        with autocast(d.device, args.precision):
            policy, losses, cr, rr = dpo_forward(model, ids, mask, batch, beta, packing)
        m = dpo_metrics(losses, cr, rr, policy[:len(batch)], policy[len(batch):])
        sums += torch.stack([v.double() for v in m.values()]) * len(batch)
    model.train()
    if d.world > 1:
        torch.distributed.all_reduce(sums)
    return {f"eval_{k}": v / len(eval_pairs) for k, v in zip(METRICS, sums.tolist())}


def card(path, adapter):
    """The model card of final/ (the new adapter) or merged/ (every adapter folded into the base)."""
    below = "".join(f" + {a}" for a in args.adapter)
    write_model_card(path, title=f"{out.name}: LoRA DPO of {args.model}{below}", base=args.model, args=vars(args),
                     data=[*data_rows, ("(mixed training pairs)", len(train_set)),
                           ("(held out for eval)", len(eval_pairs))],
                     metrics=final_metrics, world=d.world, steps=step, adapter=adapter, tags=["dpo", "lora"])


def save(name, final=False):
    check_finite_weights(model, step)
    with checkpoint(out / name, args.keep_checkpoints, final) as ckpt:
        if d.is_main:
            save_adapter(model, "default", ckpt, base_model_name_or_path=args.model)
            write_text(ckpt / "nanoalign_stack.json", json.dumps({"base": args.model, "below": args.adapter}, indent=2))
            if final:
                card(ckpt, adapter=True)
        if not final:
            save_train_state(ckpt, optimizer, scaler, step, args=vars(args))
    print0(f"saved {ckpt}")


metrics = MetricsLog(out / "metrics.jsonl", d.is_main, start_step=step)
final_metrics = {}  # the last value of every metric, eval included
guard = DivergenceGuard(args.max_bad_steps)
progress = Progress(total_steps, "dpo", d.is_main, start=step)
steps = step_batches([pair_length(ex) for ex in train_set], args.batch_size, args.grad_accum, d.rank, d.world,
                     args.seed, start_step=step)
while step < total_steps:
    t0 = time.time()
    micro = next(steps)
    lr = lr_at(step, total_steps, args.lr, args.warmup_steps, args.schedule, args.min_lr_ratio,
               max(1, round(args.lr_step_every * steps_per_epoch)), args.lr_step_gamma)
    set_lr(optimizer, lr)
    beta = beta_at(step, args.beta, args.beta_warmup_steps)
    if args.sft_weight:  # the SFT term is a mean over every chosen token of the global batch
        chosen_tokens = all_reduce_sum(sum(len(train_set[i]["chosen"]) for mb in micro for i in mb), d.device)
    sums, tokens = None, 0
    for i, idx in enumerate(micro):
        batch = [train_set[j] for j in idx]
        ids, mask, packing = batch_tensors(batch)
        tokens += ids.numel()
        with maybe_no_sync(ddp_model, sync=i == len(micro) - 1), autocast(d.device, args.precision):
            policy, losses, cr, rr = dpo_forward(ddp_model, ids, mask, batch, beta, packing)
            # mean over the pairs of the global batch; x world undoes DDP's gradient averaging
            loss = losses.sum() / global_pairs * d.world
            if args.sft_weight:
                loss = loss - args.sft_weight * policy[:len(batch)].sum() / chosen_tokens * d.world
        scaler.scale(loss).backward()
        m = dpo_metrics(losses.detach(), cr, rr, policy[:len(batch)].detach(), policy[len(batch):].detach())
        row = torch.stack([v.float() for v in m.values()]) * len(batch)
        sums = row if sums is None else sums + row
    if d.world > 1:
        torch.distributed.all_reduce(sums)
    means = {k: v / global_pairs for k, v in zip(METRICS, sums.tolist())}
    grad_norm, bad = optimizer_step(model, optimizer, scaler, args.clip, means["loss"])
    step += 1
    dt, tokens = time.time() - t0, all_reduce_sum(tokens, d.device)  # positions computed, pads included
    row = dict(step=step, lr=lr, beta=beta, grad_norm=grad_norm, **means, pairs_per_s=global_pairs / dt,
               tokens_per_s=tokens / dt, **({"skipped": True} if bad else {}))
    if (args.eval_every and step % args.eval_every == 0 or step == total_steps) and eval_pairs:
        row.update(evaluate(beta))
    metrics.log(**row)
    tracker.log(step, row)
    final_metrics.update(row)
    guard.update(step, bad, row["loss"], grad_norm)
    progress.update(1, rate(tokens, dt, "tok"), loss=row["loss"], lr=f"{lr:.2e}", acc=row["reward_acc"],
                    margin=row["reward_margin"], **({"eval_acc": row["eval_reward_acc"]} if "eval_reward_acc" in row else {}))
    if args.save_every and step % args.save_every == 0 and step < total_steps:
        save(f"ckpt-{step}")
progress.close()
tracker.close(final_metrics)
if args.save_every:
    save(f"ckpt-{step}")
save("final", final=True)
if args.merge and d.is_main:
    # merged in fp32 from the saved files (the live base may be bf16), written in the base checkpoint's dtype
    merged = load_merged(model_dir, [*args.adapter, out / "final"], dtype=torch.float32)
    save_model(merged, out / "merged", tokenizer_from=tokenizer_dir, dtype=getattr(torch, model.config.torch_dtype))
    card(out / "merged", adapter=False)
    print0(f"saved {out / 'merged'} (every adapter folded in)")
cleanup_distributed()
