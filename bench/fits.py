"""What fits where, COMPUTED (not measured): Qwen2.5 0.5B/1.5B/3B/7B, full SFT and LoRA DPO, 3x24 GB and 1x80 GB.

    python bench/fits.py

Per GPU, bytes (N = parameters, exact from each config; V vocab, d hidden, L layers, W ranks):
  full SFT, DDP     18N: fp32 weights 4 + fp32 grads 4 + AdamW 8 + autocast's bf16 weight copies 2
  full SFT, --fsdp  16N / W + bf16 gathered: embedding/lm_head (root, kept between forward and backward) and two
                    decoder blocks (the current one and the prefetched one) + one block's fp32 gradient
  LoRA DPO (DDP)    2N (bf16 frozen base, --base-dtype bf16) + adapters r 16 on 7 projections x 16 bytes a param
  + lm_head work    one-pass SFT loss: fp32 [V, d] gradient held forward to backward (SFT only) and ~2 fp32
                    [1024, V] chunk buffers
  + activations     per token per layer ~ (34 d + 6 intermediate) bytes without checkpointing (an estimate: the
                    bf16 matmul inputs, fp32 norm/residual saves; it gives the ~1.5 GB per 1k tokens expected at
                    0.5B in bench/RESULTS.md, itself unmeasured); with --grad-ckpt 4 d per layer (fp32 layer
                    inputs) plus one layer's full set.
Usable memory: 22 GiB of a 24 GB card, 76 GiB of an 80 GB one. Printed: the largest micro-batch (tokens per
rank; SFT packed rows are 2,048 tokens, a DPO pair ~1k tokens x 2) that fits, without and with checkpointing, or
"no" when the states alone do not fit. To be replaced by measured peaks (bench_sft.py / bench_dpo.py peak_gib).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoalign.model import CausalLM, ModelConfig  # noqa: E402

QWEN25 = {  # config.json of Qwen/Qwen2.5-*: hidden, intermediate, layers, heads, kv heads, tied
    "0.5B": (896, 4864, 24, 14, 2, True), "1.5B": (1536, 8960, 28, 12, 2, True),
    "3B": (2048, 11008, 36, 16, 2, True), "7B": (3584, 18944, 28, 28, 4, False)}
V, GIB = 151936, 2 ** 30
GPUS = {"3x24GB": (3, 22 * GIB), "1x80GB": (1, 76 * GIB)}


def shapes(name):
    d, inter, layers, heads, kv, tied = QWEN25[name]
    config = ModelConfig(vocab_size=V, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = CausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    hd = d // heads
    lora = layers * 16 * (2 * (d + heads * hd) + 2 * (d + kv * hd) + 2 * (d + heads * hd) + 3 * (d + inter))
    return config, n, block, lora


def max_tokens(free, per_token, fixed=0):
    return max(0, int((free - fixed) // per_token)) if free > fixed else 0


def row(name, mode, gpus):
    config, n, block, lora = shapes(name)
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    world, usable = GPUS[gpus]
    chunk = 2 * 1024 * V * 4
    if mode == "sft":
        if world > 1:
            states = 16 * n / world + 2 * V * d + 2 * 2 * block + 4 * block + 4 * V * d + chunk
            how = "FSDP"
        else:
            states = 18 * n + 4 * V * d + chunk
            how = "single GPU"
    else:
        states = 2 * n + 16 * lora + chunk
        how = "DDP" if world > 1 else "single GPU"
    free = usable - states
    act = (34 * d + 6 * inter) * layers
    act_ckpt = 4 * d * layers
    one_layer = 34 * d + 6 * inter
    plain = max_tokens(free, act)
    ckpt = max_tokens(free, act_ckpt + one_layer)
    fmt = lambda t: f"{t:,} tokens" if t else "no"  # noqa: E731
    verdict = "no: states alone exceed memory" if free <= 0 else f"{fmt(plain)} / {fmt(ckpt)} with --grad-ckpt"
    return f"| Qwen2.5-{name} ({n / 1e9:.2f}B) | {'full SFT' if mode == 'sft' else 'LoRA DPO r16'} | {gpus} ({how}) " \
           f"| {states / GIB:.1f} GiB | {verdict} |"


def main():
    print("| model | job | GPUs | states per GPU | largest micro-batch per GPU: plain / checkpointed |")
    print("| --- | --- | --- | --- | --- |")
    for name in QWEN25:
        for mode in ("sft", "dpo"):
            for gpus in GPUS:
                print(row(name, mode, gpus))


if __name__ == "__main__":
    main()
