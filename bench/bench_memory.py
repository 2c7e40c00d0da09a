"""Memory of a LoRA DPO step, phase by phase, beside TRL + PEFT on the same weights and tokens (CPU or GPU).

    python bench/bench_memory.py --layers 4                   # Qwen2.5-0.5B shapes, real vocabulary, 4 of 24 layers
    python bench/bench_memory.py --layers 4 --cases ours,peer,ours+ckpt,peer+ckpt   # the peer needs `pip install trl`
    python bench/bench_memory.py --tiny                       # CPU smoke test (tiny config)

The issue's workload (#20 item 13): LoRA r 8 / alpha 16 / dropout 0 on the seven projections, 2 pairs x (128 prompt
+ 256 response) tokens, fp32 weights loaded from a bf16 checkpoint on disk (as Qwen2.5-0.5B is stored on the hub),
no autocast, beta 0.1, the reference = the policy with its adapter off. The per-layer and the embedding / lm_head
parts separate cleanly, so fewer layers (--layers) with the real vocabulary and hidden sizes show where the memory
goes without the full model's 8-16 GiB; memory at 24 layers is then about the 4-layer figure plus 20 x the
per-layer slope (two runs at different --layers give it; measured: 7.11 GiB at 24, 7.18 from 4 and 8 layers).

Each case runs in a fresh process (a CPU process's RSS keeps what an earlier case's allocations left). Phases:
imports (the libraries' own RSS), load (the checkpoint into fp32), setup (LoRA, optimizer; TRL: the trainer), then
for each of --steps steps: policy forward (trunk + response log-probs), reference forward (no grad, adapter off, and
the loss), backward, optimizer step. Reported per phase: peak_gib (CPU: the process's peak RSS in that phase,
VmHWM reset through /proc/self/clear_refs at its start; CUDA: torch.cuda.max_memory_allocated, reset at its start)
and after_gib (RSS or memory_allocated at its end), the largest over the steps; saved_gib: what autograd saves for
backward from the loss (saved_tensors_hooks around the forward passes and the loss, distinct storages), split into
saved_activation_gib and saved_parameter_gib (storages that are model parameters, held anyway).

Case spec: `ours` (train_dpo.py's step with nanoalign's modules) or `peer` (TRL's DPOTrainer.train for --steps
steps, PEFT LoRA, bf16=False, its phases marked by a forward hook on the backbone and trainer callbacks), then
+ckpt: activation checkpointing (train_dpo.py --grad-ckpt; TRL's gradient_checkpointing, its DPOConfig default).
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS = common.PAD_ID  # <|endoftext|>, which TRL appends to each response


class Phases:
    """The peak and end-of-phase memory of each phase, the largest over repeated phases (steps)."""

    def __init__(self, device):
        self.device, self.rows = device, {}
        self.start()

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def end(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, after = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        else:
            status = Path("/proc/self/status").read_text()
            peak, after = (int(re.search(rf"{f}:\s+(\d+) kB", status).group(1)) * 1024 for f in ("VmHWM", "VmRSS"))
        old = self.rows.get(name, {"peak_gib": 0.0, "after_gib": 0.0})
        self.rows[name] = {"peak_gib": max(old["peak_gib"], peak / 2**30),
                           "after_gib": max(old["after_gib"], after / 2**30)}
        self.start()


class SavedForBackward:
    """Bytes of the distinct storages autograd saves for backward inside the block (parameters counted apart)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}

    def pack(self, t):
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.storages.clear()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def gib(self):
        params = sum(n for ptr, n in self.storages.items() if ptr in self.params)
        total = sum(self.storages.values())
        return dict(saved_gib=total / 2**30, saved_activation_gib=(total - params) / 2**30,
                    saved_parameter_gib=params / 2**30, saved_storages=len(self.storages))


def make_checkpoint(args, path):
    """Random weights at the run's shapes, saved as an HF dir in bf16 (the hub's Qwen2.5-0.5B is stored in bf16)."""
    from nanoalign.model import save_model
    save_model(common.build_causal_lm(shapes_config(args), "cpu"), path, dtype=torch.bfloat16)


def shapes(args):
    if args.tiny:
        return dict(common.TINY)
    return dict(common.QWEN05, num_hidden_layers=args.layers)


def shapes_config(args):
    return common.model_config(shapes(args))


def pairs(args, config):
    """2b rows (chosen rows, then rejected rows) of prompt + response ids, each response ending in EOS."""
    g = torch.Generator().manual_seed(0)
    high = common.token_high(config)
    prompts = torch.randint(0, high, (args.pairs, args.prompt_len), generator=g).tolist()
    responses = torch.randint(0, high, (2 * args.pairs, args.response_len - 1), generator=g).tolist()
    return [(prompts[i % args.pairs], responses[i] + [common.pad_id(config) if args.tiny else EOS])
            for i in range(2 * args.pairs)]


def run_ours(args, ckpt, phases):
    from nanoalign.lora import adapters_disabled, add_lora
    from nanoalign.losses import dpo_loss, sequence_logps
    from nanoalign.model import load_model
    from nanoalign.train import make_optimizer, make_scaler, optimizer_step
    phases.end("imports")
    device = args.device
    model = load_model(args.model_dir, dtype=torch.float32, device=device)
    phases.end("load")
    add_lora(model, "default", r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, targets=TARGETS)
    model.gradient_checkpointing = ckpt
    model.train()
    optimizer, scaler = make_optimizer(model, 5e-6, 0.0), make_scaler(device, "fp32")
    rows = pairs(args, model.config)
    ids = torch.tensor([p + r for p, r in rows], device=device)  # [2b, t], all the same length: no padding
    mask = torch.zeros_like(ids)
    mask[:, args.prompt_len:] = 1
    lm_head, b = model.lm_head.weight, args.pairs
    saved = SavedForBackward(model.parameters())
    phases.end("setup")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with saved:
            policy = sequence_logps(model(ids, return_hidden=True), lm_head, ids, mask, args.chunk_size)
            phases.end("policy forward")
            with torch.no_grad(), adapters_disabled(model, ["default"]):  # train_dpo.py's reference_logps
                model.eval()
                ref = sequence_logps(model(ids, return_hidden=True), lm_head, ids, mask, args.chunk_size)
                model.train()
            losses, _, _ = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], args.beta)
            loss = losses.mean()
        phases.end("reference forward")
        loss.backward()
        phases.end("backward")
        optimizer_step(model, optimizer, scaler, 1.0, loss.item())
        phases.end("optimizer step")
        step_s = time.perf_counter() - t0
    return dict(**saved.gib(), step_s=step_s, loss=loss.item())


def run_peer(args, ckpt, phases):
    import peft
    import tokenizers
    import transformers
    import trl
    from datasets import Dataset
    phases.end("imports")
    device = args.device
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    phases.end("load")
    config = shapes_config(args)
    words = {f"w{i}": i for i in range(common.token_high(config))}
    words["<eos>"] = common.pad_id(config) if args.tiny else EOS
    vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    vocab.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<eos>", pad_token="<eos>")
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    rows = pairs(args, config)
    b = args.pairs
    data = [{"prompt": text(rows[j][0]), "chosen": " " + text(rows[j][1][:-1]),
             "rejected": " " + text(rows[b + j][1][:-1])} for j in range(b)] * args.steps  # TRL appends the EOS
    cfg = trl.DPOConfig(output_dir=str(args.work / "trl"), per_device_train_batch_size=b, max_steps=args.steps,
                        learning_rate=5e-6, beta=args.beta, bf16=False, gradient_checkpointing=ckpt, report_to=[],
                        save_strategy="no", logging_steps=10**6, max_length=args.prompt_len + args.response_len,
                        use_cpu=device.type == "cpu", dataloader_num_workers=0)
    saved, out = None, {}

    class Trainer(trl.DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            assert inputs["input_ids"].shape == (2 * b, args.prompt_len + args.response_len), inputs["input_ids"].shape
            with saved:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            phases.end("reference forward")
            out["loss"] = float(result[0] if return_outputs else result)
            return result

    class Marks(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            out["t0"], out["calls"] = time.perf_counter(), 0
            phases.start()

        def on_pre_optimizer_step(self, *a, **k):
            phases.end("backward")

        def on_optimizer_step(self, *a, **k):
            phases.end("optimizer step")
            out["step_s"] = time.perf_counter() - out["t0"]

    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                      peft_config=lora, callbacks=[Marks()])
    saved = SavedForBackward(trainer.model.parameters())

    def backbone_called(module, inputs):  # its second call in a step starts the reference forward
        out["calls"] += 1
        if out["calls"] == 2:
            phases.end("policy forward")
    trainer.model.get_base_model().model.register_forward_pre_hook(backbone_called)
    phases.end("setup")
    trainer.train()
    return dict(**saved.gib(), step_s=out["step_s"], loss=out["loss"], trl=trl.__version__, peft=peft.__version__,
                transformers=transformers.__version__)


def worker(args):
    """One case in this process: RESULT line with its phases."""
    ckpt = args.worker.endswith("+ckpt")
    phases = Phases(args.device)
    r = (run_peer if args.worker.startswith("peer") else run_ours)(args, ckpt, phases)
    cfg = shapes(args)
    row = dict(case=f"{'trl_peft' if args.worker.startswith('peer') else 'ours'}_dpo_lora_memory"
               + ("_ckpt" if ckpt else ""), layers=cfg["num_hidden_layers"], vocab=cfg["vocab_size"],
               pairs=args.pairs, prompt_len=args.prompt_len, response_len=args.response_len, lora_r=args.lora_r,
               grad_ckpt=ckpt, steps=args.steps, measure="cuda_allocated" if args.device.type == "cuda" else "cpu_rss",
               peak_gib=max(p["peak_gib"] for p in phases.rows.values()), phases=phases.rows, **r)
    common.emit({**row, **common.meta(args)})


def main():
    p = common.base_parser(__doc__)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of Qwen2.5-0.5B's 24")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--work", type=Path, default=Path("/tmp/nanoalign-bench-memory"),
                   help="where the checkpoint (and TRL's output dir) go")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = common.setup(p.parse_args(), warmup=0, steps=2, tiny_warmup=0, tiny_steps=2)
    if args.tiny:
        args.pairs, args.prompt_len, args.response_len, args.chunk_size = 2, 16, 32, 48
    if args.worker:
        return worker(args)
    print(common.env_line(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = shapes(args)
    model_dir = args.work / f"qwen2.5-0.5b-shapes-{cfg['num_hidden_layers']}l-{cfg['vocab_size']}v"
    if not (model_dir / "config.json").exists():
        make_checkpoint(args, model_dir)
    specs = [s.strip() for s in (args.cases or ("ours,ours+ckpt" if args.tiny else "ours")).split(",") if s.strip()]
    for spec in specs:
        if spec.split("+")[0] not in ("ours", "peer") or spec.split("+")[1:] not in ([], ["ckpt"]):
            raise SystemExit(f"unknown case {spec!r}: ours or peer, optionally +ckpt")
        flags = ["--layers", args.layers, "--pairs", args.pairs, "--prompt-len", args.prompt_len, "--response-len",
                 args.response_len, "--lora-r", args.lora_r, "--beta", args.beta, "--chunk-size", args.chunk_size,
                 "--steps", args.steps, "--device", args.device, "--work", args.work]
        flags += ["--tiny"] if args.tiny else []
        proc = subprocess.run([sys.executable, __file__, *map(str, flags), "--worker", spec, "--model-dir", model_dir],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            common.emit(dict(case=spec, error=proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"],
                             **common.meta(args)))
        for line in lines:
            print(line, flush=True)


if __name__ == "__main__":
    main()
