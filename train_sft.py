"""Supervised fine-tuning on chat data, loss on assistant tokens only.

One GPU or CPU:
    python train_sft.py --model Qwen/Qwen2.5-0.5B --data HuggingFaceTB/smol-smoltalk --out runs/sft
Three GPUs:
    torchrun --nproc_per_node=3 train_sft.py --model Qwen/Qwen2.5-0.5B --data HuggingFaceTB/smol-smoltalk --out runs/sft

Conversations are packed into rows of --max-len tokens (--no-pack: one right-padded conversation a row), each
attending only to itself. The global batch is batch_size x grad_accum x world_size rows (conversations with
--no-pack); the loss is the mean over every assistant token of that global batch.
Writes <out>/metrics.jsonl, <out>/ckpt-<step>/ (HF model dir + train state to --resume from; the newest
--keep-checkpoints of them are kept) and <out>/final/ (HF model dir, or a LoRA adapter with --lora). One run at a
time per --out (<out>/.lock); <out>/run_settings.json records the settings a rerun or --resume must share.
"""
import argparse
import itertools
import os
import time
from pathlib import Path

import torch

from nanoalign.chat import load_chat
from nanoalign.data import content_key, pack, packed_batch, pad_right, sft_batches, shard, split_holdout, step_batches
from nanoalign.errors import InputError
from nanoalign.losses import masked_logps, sft_loss
from nanoalign.tokenized import sft_dataset
from nanoalign.model import (PACKED_ATTENTION, CausalLM, check_vocab, load_model, resolve_model_dir,
                             save_model)
from nanoalign.report import REPORT_TO, open_tracker, require_backend, write_model_card
from nanoalign.rundir import add_flags, check_settings, checkpoint, lock_out_dir, settings_from
from nanoalign.train import (DivergenceGuard, MetricsLog, Progress, all_reduce_sum, autocast, check_finite_weights,
                             choose_precision, cleanup_distributed, fraction, full_state_dict, load_train_state, lr_at,
                             make_optimizer, make_scaler, maybe_no_sync, nonneg_float, nonneg_int, one_line_errors,
                             optimizer_step, positive_float, positive_int, print0, random_seed, rate, require_torch,
                             resolve_resume, save_train_state, set_lr, setup_distributed, wrap_ddp,
                             wrap_fsdp, zero_to_one)

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True, help="HF model dir or hub id (e.g. Qwen/Qwen2.5-0.5B)")
parser.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: --model)")
parser.add_argument("--data", required=True, help="JSONL/JSON/parquet file or dir, or hub dataset id; rows carry `messages`")
parser.add_argument("--data-split", default="train")
parser.add_argument("--data-config", default=None, help="hub dataset config, e.g. `all` for HuggingFaceTB/smoltalk")
parser.add_argument("--out", required=True, help="output dir")
parser.add_argument("--data-cache", default=os.environ.get("NANOALIGN_CACHE", str(Path.home() / ".cache/nanoalign")),
                    help="dir of tokenised datasets, reused while data, tokenizer and settings are unchanged "
                         "(default $NANOALIGN_CACHE or ~/.cache/nanoalign; '' = tokenise in memory each run)")
parser.add_argument("--max-len", type=positive_int, default=2048, help="longest conversation in tokens")
parser.add_argument("--truncation", choices=["drop", "cut"], default="drop", help="what to do with longer ones")
parser.add_argument("--eval-frac", type=fraction, default=0.02,
                    help="share of conversations held out for eval loss, in [0, 1)")
parser.add_argument("--batch-size", type=positive_int, default=8,
                    help="packed rows of --max-len tokens (conversations with --no-pack) per micro-batch per rank")
parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                    help="pack conversations into rows of --max-len tokens (default), or --no-pack: pad each one")
parser.add_argument("--pack-attn", choices=PACKED_ATTENTION, default="sdpa",
                    help="attention kernel of packed rows: sdpa (block-diagonal mask, any device), flex "
                         "(FlexAttention, CUDA), varlen (flash varlen, CUDA)")
parser.add_argument("--grad-accum", type=positive_int, default=1)
parser.add_argument("--epochs", type=positive_float, default=1.0)
parser.add_argument("--max-steps", type=nonneg_int, default=0, help="optimizer steps (overrides --epochs)")
parser.add_argument("--lr", type=positive_float, default=2e-5)
parser.add_argument("--min-lr-ratio", type=zero_to_one, default=0.0, help="the LR decays to lr x this, in [0, 1]")
parser.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
parser.add_argument("--warmup-steps", type=nonneg_int, default=0)
parser.add_argument("--weight-decay", type=nonneg_float, default=0.0)
parser.add_argument("--clip", type=nonneg_float, default=1.0, help="max gradient norm (0 = off)")
parser.add_argument("--max-bad-steps", type=nonneg_int, default=3,
                    help="stop after this many steps in a row with a non-finite loss or gradient norm, each skipped "
                         "(0 = never stop; fp16 overflows the GradScaler skips do not count)")
parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                    help="autocast dtype (default: bf16 on a CUDA GPU that supports it, else fp32)")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--fsdp", action="store_true",
                    help="FSDP2 instead of DDP: parameters, gradients and optimizer state sharded over the ranks "
                         "(each decoder block; bf16 parameters, fp32 gradient reduction under bf16 on CUDA)")
parser.add_argument("--chunk-size", type=positive_int, default=1024, help="rows per chunk of the lm_head + loss")
parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
parser.add_argument("--lora-r", type=positive_int, default=16)
parser.add_argument("--lora-alpha", type=positive_float, default=32, help="the adapter's output is scaled by alpha / r")
parser.add_argument("--lora-dropout", type=fraction, default=0.05, help="dropout on the adapter's input, in [0, 1)")
parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
parser.add_argument("--eval-every", type=nonneg_int, default=100, help="steps between eval losses (0 = only at the end)")
parser.add_argument("--save-every", type=nonneg_int, default=500, help="steps between checkpoints (0 = only final)")
add_flags(parser, "Each costs the fp32 weights plus AdamW's two fp32 moments, saved once whatever the number of "
                  "ranks: 12 bytes a parameter (Qwen2.5-0.5B 5.9 GB, 7B 91 GB); with --lora only the adapter and "
                  "its moments (0.5B at r 16: 0.1 GB)")
parser.add_argument("--report-to", choices=REPORT_TO, default="none",
                    help="also send metrics to TensorBoard (<out>/tensorboard) or W&B; metrics.jsonl is always written")
parser.add_argument("--seed", type=random_seed, default=0, help="an integer in [0, 2^63 - 1]")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
# flags that do not change what is computed, free to change between runs (README "Runs that survive"): every other
# one is recorded in <out>/run_settings.json
FREE = ["out", "data_cache", "pack_attn", "max_bad_steps", "grad_ckpt", "compile", "chunk_size", "eval_every",
        "save_every", "keep_checkpoints", "resume", "overwrite", "report_to", "device"]
args = parser.parse_args()
one_line_errors()
if args.fsdp and args.lora:
    parser.error("--fsdp is for full fine-tuning; LoRA trains few parameters: use DDP (drop --fsdp)")
if args.fsdp:
    require_torch("--fsdp")
if args.pack and args.pack_attn == "varlen":
    require_torch("--pack-attn varlen")
cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
if args.pack and args.pack_attn != "sdpa" and not cuda:
    parser.error(f"--pack-attn {args.pack_attn} needs CUDA (FlexAttention has no backward on CPU, varlen is "
                 f"flash attention); use --pack-attn sdpa")
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
    args, FREE, unused=([] if args.lora else ["lora_r", "lora_alpha", "lora_dropout", "lora_targets"])
    + (["max_steps", "epochs"] if args.schedule == "constant" else ["epochs"] if args.max_steps else ["max_steps"]),
    files=["model", "tokenizer", "data"],  # also recorded by what is at their paths: retrained or edited is another
    **{"global batch (--batch-size x --grad-accum x ranks)": args.batch_size * args.grad_accum * d.world}),
    args.overwrite, resume=args.resume)
tracker = open_tracker(args.report_to, args.out, vars(args), d.is_main)
resume_dir = resolve_resume(args.resume, out, sharded=args.fsdp)  # checked now, before any work
model_dir = resolve_model_dir(args.model)
tokenizer_dir = resolve_model_dir(args.tokenizer) if args.tokenizer else model_dir
chat = load_chat(tokenizer_dir)  # the default system prompt is the one of the dir's own chat template

# data: rendered with the assistant mask once (local rank 0; cached, the others wait for it and load it), an eval
# split held out and sharded over ranks
dataset = sft_dataset(args.data, args.data_split, args.data_config, chat, args.max_len, args.truncation,
                      args.data_cache or None, is_builder=d.local_rank == 0)
print0(f"data: {dataset.stats}")
# held out by content: every copy of a conversation (same token ids and mask) goes to the same side
train_idx, eval_idx = split_holdout(list(range(len(dataset))), args.eval_frac, args.seed,
                                    key=lambda i: content_key(dataset[i]))
# uneven eval shares: the eval loss covers every held-out conversation whatever the world size
train_set, eval_set = dataset.subset(train_idx), dataset.subset(shard(eval_idx, d.rank, d.world))
# a training unit is a packed row (lists of conversation indices), or one conversation
lengths = train_set.lengths
units = pack(lengths, args.max_len, args.seed) if args.pack else [[i] for i in range(len(train_set))]
steps_per_epoch = len(units) // (args.batch_size * args.grad_accum * d.world)
unit_name = "packed rows" if args.pack else "conversations"
if steps_per_epoch == 0:
    raise InputError(f"{len(units)} {unit_name} are fewer than one global batch "
                     f"(--batch-size x --grad-accum x world size)")
total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
print0(f"{len(train_set)} train / {len(eval_idx)} eval conversations"
       + (f" in {len(units)} packed rows" if args.pack else "") + f"; {total_steps} steps")

# model (fp32 master weights; autocast does the matmuls in bf16/fp16)
model = load_model(resume_dir if resume_dir and not args.lora else model_dir, device=d.device)
check_vocab(chat.vocab_size, model.config, args.tokenizer or args.model, args.model)
if args.lora:
    from nanoalign.lora import add_lora, describe, load_adapter
    if resume_dir:
        load_adapter(model, resume_dir, name="default", trainable=True)
    else:
        add_lora(model, "default", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                 targets=args.lora_targets.split(","))
    print0(describe(model))
model.gradient_checkpointing = args.grad_ckpt
model.model.packed_attention = args.pack_attn
model.train()
if args.fsdp:  # sharded in place, before the optimizer sees the parameters
    wrap_fsdp(model, d, args.precision)
optimizer = make_optimizer(model, args.lr, args.weight_decay)
scaler = make_scaler(d.device, args.precision)
step = 0
if resume_dir:
    step = load_train_state(resume_dir, optimizer, scaler, sharded=args.fsdp)["step"]
    print0(f"resumed from {resume_dir} at step {step}")
compiled = torch.compile(model) if args.compile else model
ddp_model = compiled if args.fsdp else wrap_ddp(compiled, d)


def lm_head():
    """Read after the forward: under FSDP the gathered weight is only there between forward and backward."""
    return model.lm_head.weight


def step_micro_batches(start_step):
    """This rank's micro-batches (input_ids, loss_mask, document_ids or None) of each step; the global batch is
    world-size invariant."""
    unit_lengths = [sum(lengths[i] for i in unit) for unit in units]
    for micro in step_batches(unit_lengths, args.batch_size, args.grad_accum, d.rank, d.world, args.seed, start_step):
        if args.pack:
            yield [tuple(x.to(d.device) for x in packed_batch(train_set, [units[u] for u in idx], args.max_len,
                                                              chat.pad_id)) for idx in micro]
        else:
            yield [(pad_right([train_set[u]["ids"] for u in idx], chat.pad_id).to(d.device),
                    pad_right([train_set[u]["mask"] for u in idx], 0).to(d.device), None) for idx in micro]


@torch.no_grad()
def evaluate():
    """Mean loss over every assistant token of the eval split: per-rank sums (a rank may have none) all-reduced.
    Under FSDP each forward is a collective: a rank with fewer batches (uneven shares) runs forwards of a padding
    row, nothing trained, until it has run as many as the rank with the most."""
    model.eval()
    nll, count = 0.0, 0
    batches = sft_batches(eval_set, args.batch_size, chat.pad_id)
    if args.fsdp:
        mine = -(-len(eval_set) // args.batch_size)  # the number of batches sft_batches yields
        most = torch.tensor(mine, device=d.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        padding = (torch.full((1, 2), chat.pad_id), torch.zeros(1, 2, dtype=torch.long))
        batches = itertools.chain(batches, [padding] * (int(most) - mine))
    for ids, mask in batches:
        ids, mask = ids.to(d.device), mask.to(d.device)
        with autocast(d.device, args.precision):
            hidden = model(ids, return_hidden=True)
            logps, _ = masked_logps(hidden, lm_head(), ids, mask, args.chunk_size)
        nll, count = nll - logps.sum().item(), count + logps.numel()
    model.train()
    return all_reduce_sum(nll, d.device) / max(all_reduce_sum(count, d.device), 1)


def save(name, final=False):
    check_finite_weights(model, step)
    with checkpoint(out / name, args.keep_checkpoints, final) as ckpt:
        state = full_state_dict(model) if args.fsdp else None  # a collective: every rank gathers, rank 0 keeps it
        if d.is_main:
            if args.fsdp:
                save_model(unsharded_copy(state), ckpt, tokenizer_from=tokenizer_dir)
            elif args.lora:
                from nanoalign.lora import save_adapter
                save_adapter(model, "default", ckpt, base_model_name_or_path=args.model)
            else:
                save_model(model, ckpt, tokenizer_from=tokenizer_dir)
            if final:
                write_model_card(ckpt, title=f"{out.name}: SFT of {args.model}", base=args.model, args=vars(args),
                                 data=[(args.data, len(train_set)), ("(held out for eval loss)", len(eval_idx))],
                                 metrics=final_metrics, world=d.world, steps=step, adapter=args.lora, tags=["sft"])
        if not final:
            save_train_state(ckpt, optimizer, scaler, step, sharded=args.fsdp, args=vars(args))
    print0(f"saved {ckpt}")


def unsharded_copy(state):
    """A plain CausalLM holding the gathered FSDP state dict (CPU tensors, no copy)."""
    with torch.device("meta"):
        plain = CausalLM(model.config)
    plain.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


metrics = MetricsLog(out / "metrics.jsonl", d.is_main, start_step=step)
final_metrics = {}  # the last value of every metric, eval included
guard = DivergenceGuard(args.max_bad_steps)
progress = Progress(total_steps, "sft", d.is_main, start=step)
steps = step_micro_batches(start_step=step)
while step < total_steps:
    t0 = time.time()
    micro = next(steps)
    # the loss divides by the trained-token count of the whole global step, not per micro-batch (PITFALLS #7)
    step_tokens = all_reduce_sum(sum(int(m[:, 1:].sum()) for _, m, _ in micro), d.device)
    lr = lr_at(step, total_steps, args.lr, args.warmup_steps, args.schedule, args.min_lr_ratio)
    set_lr(optimizer, lr)
    loss_sum = 0.0
    for i, (ids, mask, docs) in enumerate(micro):
        with maybe_no_sync(ddp_model, sync=i == len(micro) - 1), autocast(d.device, args.precision):
            hidden = ddp_model(ids, return_hidden=True, document_ids=docs)
            # DDP averages gradients over ranks; x world turns that average back into the global token mean
            loss = sft_loss(hidden, lm_head(), ids, mask, num_tokens=step_tokens, chunk_size=args.chunk_size) * d.world
        scaler.scale(loss).backward()
        loss_sum += loss.detach() / d.world  # stays on the device: one sync per step, below
    loss_value = all_reduce_sum(float(loss_sum), d.device)
    grad_norm, bad = optimizer_step(model, optimizer, scaler, args.clip, loss_value)
    step += 1
    tokens = all_reduce_sum(sum(ids.numel() for ids, _, _ in micro), d.device)  # positions computed, pads included
    dt = time.time() - t0
    row = dict(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm, trained_tokens=int(step_tokens),
               tokens_per_s=tokens / dt, **({"skipped": True} if bad else {}))
    if (args.eval_every and step % args.eval_every == 0 or step == total_steps) and eval_idx:
        row["eval_loss"] = evaluate()
    metrics.log(**row)
    tracker.log(step, row)
    final_metrics.update(row)
    guard.update(step, bad, loss_value, grad_norm)
    progress.update(1, rate(tokens, dt, "tok"), loss=loss_value, lr=f"{lr:.2e}",
                    **({"eval": row["eval_loss"]} if "eval_loss" in row else {}))
    if args.save_every and step % args.save_every == 0 and step < total_steps:
        save(f"ckpt-{step}")
progress.close()
tracker.close(final_metrics)
if args.save_every:
    save(f"ckpt-{step}")
save("final", final=True)
cleanup_distributed()
