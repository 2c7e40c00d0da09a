"""The Qwen2 / Qwen2.5 decoder (and the Qwen3 variant the reward model needs), written out by hand.

Parameter names equal Hugging Face's, so an HF model dir loads with no renaming and `save_model` writes a dir
that `transformers.AutoModelForCausalLM.from_pretrained` reads back. Every Qwen2.5 size is the same code with a
different config.json: tied or untied embeddings, grouped-query attention, q/k/v bias, rope_theta, rms_norm_eps.

    model = load_model("Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                       # [b, t, vocab]
    hidden = model(input_ids, return_hidden=True)   # [b, t, d]: losses apply lm_head in chunks
    hidden = model(packed_ids, document_ids=doc_ids, return_hidden=True)  # packed rows, one document each run
"""
from dataclasses import asdict, dataclass, fields
from itertools import chain
import json
import math
from pathlib import Path
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from nanoalign.errors import InputError
from nanoalign.jsonl import read_json
from nanoalign.rundir import atomic_path, write_text

SUPPORTED = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells them
# what config.json's numbers must be (a string "two" or a NaN would fail deep inside the model otherwise)
FIELD_CHECKS = {int: (lambda v: type(v) is int and v > 0, "an integer >= 1"),
                float: (lambda v: type(v) in (int, float) and 0 < v < math.inf, "a finite number > 0"),
                bool: (lambda v: type(v) is bool, "true or false")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0                 # 0: hidden_size // num_attention_heads (Qwen2); explicit in Qwen3
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    attention_bias: bool = True       # bias on q/k/v (always in Qwen2); on q/k/v/o when set in Qwen3 (default off)
    qk_norm: bool = False             # Qwen3: RMSNorm over each head of q and k, before RoPE
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf(cls, d: dict, source="config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise InputError(f"{source}: unsupported model_type {model_type!r} (nanoalign supports {sorted(SUPPORTED)})")
        if d.get("use_sliding_window"):
            raise InputError(f"{source}: use_sliding_window=true is not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers 5 / 4 spelling
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise InputError(f"{source}: rope scaling {rope} is not supported")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        kw["head_dim"] = d.get("head_dim") or 0
        kw["qk_norm"] = model_type == "qwen3"
        kw["attention_bias"] = d.get("attention_bias", False) if model_type == "qwen3" else True
        kw["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
        required = [f.name for f in fields(cls) if f.name in REQUIRED and f.name not in kw]
        if required:
            raise InputError(f"{source}: missing field(s) {required}")
        for f in fields(cls):
            if f.name in kw and f.type in FIELD_CHECKS:
                ok, want = FIELD_CHECKS[f.type]
                if not ok(kw[f.name]) and not (f.name == "head_dim" and kw[f.name] == 0):
                    raise InputError(f"{source}: field {f.name!r} must be {want}, got {kw[f.name]!r}")
        heads, kv_heads = kw["num_attention_heads"], kw["num_key_value_heads"]
        if not (isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads == 0):
            raise InputError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({kv_heads})")
        return cls(**kw)

    def to_hf(self, architecture=None) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "qk_norm" and v is not None}
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        d.update(architectures=[architecture or SUPPORTED[self.model_type]], hidden_act="silu",
                 use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers,
                 attention_dropout=0.0, initializer_range=0.02, use_cache=True, rope_scaling=None)
        return d


def resolve_model_dir(path_or_hub_id) -> Path:
    """A local dir as is; otherwise a hub id (see is_hub_id), downloaded (config, weights, tokenizer) by
    huggingface_hub. A name that is neither says both in one line (FileNotFoundError)."""
    path, name = Path(path_or_hub_id), str(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(name):
        owner = Path(name.split("/")[0])
        why = " (not a dir)" if path.exists() else (
            f" ({owner}/ is a local dir, so this is a path, not a hub id)" if HUB_ID.fullmatch(name) else "")
        raise FileNotFoundError(f"model dir not found: {name}{why}")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "merges.txt"]))
    except Exception as e:  # offline without it in the cache, no such repo, gated: one line
        reason = " ".join(str(e).split())[:300]
        raise FileNotFoundError(f"model dir not found: {name} is no local dir, and as a hub id: "
                                f"{type(e).__name__}: {reason}") from None


def is_hub_id(name) -> bool:
    """Whether a name that is no local dir may be a hub id: `owner/name` spelled as the hub spells them, and not
    a path in disguise: './x', '/x', '~/x', 'a/b/c', or 'runs/x' while runs/ is a local dir (a typo in a run dir
    must say "not found", not send the name to the hub)."""
    name = str(name)
    return HUB_ID.fullmatch(name) is not None and not Path(name.split("/")[0]).is_dir()


def load_config(path) -> ModelConfig:
    config_file = resolve_model_dir(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {config_file.parent}")
    return ModelConfig.from_hf(read_json(config_file), source=str(config_file))


# -----------------------------------------------------------------------------
# The decoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for the given positions, computed in fp32 like HF: [b, t, head_dim] each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [b, t, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [b, h, t, hd], cos/sin [b, t, hd]
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Static, preallocated keys and values, one buffer per layer: [slots, n_kv, max_len, head_dim]; each slot holds
    one sequence from position 0 (no left padding), so a token's position is its slot index in the cache.

    A forward given the cache either prefills `rows` (set by the caller: new sequences, right-padded, from position 0;
    they attend causally among themselves, which never reaches a pad) or, with rows = None, decodes every slot (one
    token each at its position_ids, attending to the cache up to that position, read through the first `span` keys).
    Writes are index_put_ at tensor positions, so a decode step has static shapes and no host sync: a CUDA graph or
    torch.compile(mode="reduce-overhead") can capture it. What a pad or an idle slot writes beyond a sequence's end
    is overwritten before any query may attend to it.
    """

    def __init__(self, config: ModelConfig, slots, max_len, dtype, device):
        shape = (slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.all_rows = torch.arange(slots, device=device)
        self.key_slots = torch.arange(max_len, device=device)
        self.max_len = self.span = max_len
        self.rows = None  # [n] long slots being prefilled, or None: decode all slots
        self.positions = None

    def begin(self, position_ids):
        """Called by the forward: remembers where its tokens go; returns the decode mask [b, 1, t, span] (True =
        may attend) or None for a prefill (plain causal attention)."""
        self.positions = position_ids  # [b, t]
        if self.rows is not None:
            return None
        return (self.key_slots[:self.span] <= position_ids[:, :, None])[:, None]

    def update(self, layer_idx, k, v):
        """Write k/v [b, n_kv, t, hd] at (row, position); return what the queries attend to."""
        rows = (self.all_rows if self.rows is None else self.rows)[:, None]  # [b, 1]
        self.k[layer_idx][rows, :, self.positions] = k.transpose(1, 2)  # [b, t, n_kv, hd] at (row, position)
        self.v[layer_idx][rows, :, self.positions] = v.transpose(1, 2)
        if self.rows is not None:
            return k, v
        return self.k[layer_idx][:, :, :self.span], self.v[layer_idx][:, :, :self.span]


def grouped_decode_attention(q, k, v, mask):
    """Masked attention of a few queries per row with grouped K/V heads, reading each K/V head once (SDPA with a
    mask and enable_gqa falls back to its math kernel, which expands K/V to every query head first).

    q [b, h, t, hd], k/v [b, n_kv, s, hd], mask [b, 1, t, s] bool -> [b, h, t, hd]
    """
    b, h, t, hd = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    q = q.reshape(b, n_kv, g * t, hd)  # query head i uses kv head i // g, as repeat_interleave
    att = (q @ k.transpose(-1, -2)).float() * hd ** -0.5  # [b, n_kv, g*t, s]
    att = att.view(b, n_kv, g, t, s).masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    y = att.view(b, n_kv, g * t, s).to(v.dtype) @ v  # [b, n_kv, g*t, hd]
    return y.view(b, h, t, hd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        # Qwen2 has bias on q/k/v only; Qwen3's attention_bias covers o_proj too
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=config.attention_bias and config.model_type == "qwen3")
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer_idx: int):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [b, n_kv, t, hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [b, n_head, t, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [b, n_kv, t, hd]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
            if mask is not None:  # decoding: a few queries over the whole cache
                y = grouped_decode_attention(q, k, v, mask)
                return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
        gqa = self.n_kv != self.n_head
        if isinstance(mask, Documents):  # packed rows: attention confined to each document
            y = mask.attend(q, k, v, gqa)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
        if gqa and mask is not None and t > 1:
            # SDPA's fused kernels that take a mask want equal head counts (else it falls back to the math kernel);
            # one-token decode steps and unmasked training keep native GQA
            k, v = (x.repeat_interleave(self.n_head // self.n_kv, dim=1) for x in (k, v))
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask):
    """Boolean [b, 1, t, t] mask (True = may attend) for a left-padded input.

    Every query may attend to its own slot, so a padded query row is never fully masked: SDPA turns a row with
    nothing to attend to into NaN, which would then leak through the gradients (PITFALLS #5).
    """
    t = attention_mask.shape[1]
    keys = attention_mask.bool()  # [b, t]
    slot = torch.arange(t, device=keys.device)
    causal = slot[None, :] <= slot[:, None]                                 # [t, t]
    return (causal & keys[:, None, :] | torch.eye(t, dtype=torch.bool, device=keys.device))[:, None]  # [b, 1, t, t]


# -----------------------------------------------------------------------------
# Packed rows: several documents (conversations) in one row, each attending only to itself

PACKED_ATTENTION = ("sdpa", "flex", "varlen")
_compiled_flex = None


def document_positions(document_ids):
    """Positions restarting at 0 at each document: [b, t] ids -> [b, t] positions (no host sync)."""
    t = document_ids.shape[1]
    idx = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(-1).values


class Documents:
    """The attention mask of packed rows: causal within a document, nothing across documents.

    document_ids [b, t]: equal ids = one document; a document is one contiguous run of a row (a row's padding
    tail is a document of its own). `impl` picks the kernel (all give the same result):
      sdpa    boolean block-diagonal causal mask [b, 1, t, t] into SDPA (any device; O(t^2) mask memory)
      flex    FlexAttention with a BlockMask that skips the blocks between documents (compiled on CUDA)
      varlen  flash attention over the flattened rows cut at document starts (CUDA only, no mask at all)
    """

    def __init__(self, document_ids, impl="sdpa"):
        assert impl in PACKED_ATTENTION, f"packed attention must be one of {PACKED_ATTENTION}, got {impl!r}"
        b, t = document_ids.shape
        self.impl, dev = impl, document_ids.device
        if impl == "sdpa":
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            self.mask = ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]  # [b, 1, t, t]
        elif impl == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document_causal(b, h, q, k):
                return (document_ids[b, q] == document_ids[b, k]) & (k <= q)
            self.mask = create_block_mask(same_document_causal, b, None, t, t, device=dev)
        else:
            starts = torch.ones(b, t, dtype=torch.bool, device=dev)
            starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            at = starts.flatten().nonzero().flatten()
            self.cu_seqlens = torch.cat([at, at.new_tensor([b * t])]).to(torch.int32)  # [docs + 1]
            self.max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())  # one host sync per forward

    def attend(self, q, k, v, gqa):  # q [b, n_head, t, hd], k/v [b, n_kv, t, hd] -> [b, n_head, t, hd]
        if self.impl == "sdpa":
            if gqa:  # SDPA's fused kernels that take a mask want equal head counts
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        if self.impl == "flex":
            return _flex_attention(q.device)(q, k, v, block_mask=self.mask, enable_gqa=gqa)
        from torch.nn.attention.varlen import varlen_attn
        b, h, t, hd = q.shape
        flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], hd) for x in (q, k, v)]  # [b*t, heads, hd]
        y = varlen_attn(*flat, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len,
                        window_size=(-1, 0), enable_gqa=gqa)
        return y.view(b, t, h, hd).transpose(1, 2)


def _flex_attention(device):
    """flex_attention, compiled on CUDA (eager flex runs a slow reference path; fine for CPU tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.packed_attention = "sdpa"  # kernel for document_ids (see Documents)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None,
                document_ids=None):
        """kv_cache: see KVCache (position_ids required, attention_mask unused); document_ids: packed training rows
        (see Documents); otherwise a right-padded or unpadded batch (no mask, or all ones) runs plain causal
        attention, flash path, no host sync."""
        if document_ids is not None:  # packed rows (training): no padding mask, no cache
            assert attention_mask is None and kv_cache is None, "document_ids is for packed training rows"
            position_ids = document_positions(document_ids) if position_ids is None else position_ids
            return self._run(input_ids, position_ids, Documents(document_ids, self.packed_attention), None)
        if kv_cache is not None:
            assert position_ids is not None, "a forward with a KV cache needs position_ids"
            mask = kv_cache.begin(position_ids)
        else:
            padded = attention_mask is not None and not bool(attention_mask.all())
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if padded else \
                    torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            mask = attention_mask_4d(attention_mask) if padded else None
        return self._run(input_ids, position_ids, mask, kv_cache)

    def _run(self, input_ids, position_ids, mask, kv_cache):
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self):
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on):
        self.model.gradient_checkpointing = on

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, return_hidden=False,
                document_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids, kv_cache, document_ids)  # [b, t, d]
        return hidden if return_hidden else self.lm_head(hidden)

    def init_weights(self, std=0.02, seed=0):
        """Random init like HF (normal(0, std) linears/embeddings, zero biases, unit norms): tests and the demo."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


# -----------------------------------------------------------------------------
# Loading and saving HF-format dirs

def read_safetensors_dir(model_dir) -> "StoredTensors":
    """All tensors of an HF dir, read when taken: one `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    for shard in shards:
        if not (model_dir / shard).exists():
            raise FileNotFoundError(f"{model_dir / shard} is listed in {index.name} but missing")
    return StoredTensors([model_dir / shard for shard in shards])


class StoredTensors:
    """The tensors of safetensors files by name, each read from disk (pread, no file mapping) when popped: a
    checkpoint converted to another dtype holds one stored tensor at a time, not the whole file (a bf16 file
    mapped beside its fp32 copy was half the model again), and nothing keeps the file's pages resident."""

    def __init__(self, files):
        self.file, self.shape = {}, {}  # name -> (path, its file opened once: a pread handle holds a descriptor)
        for path in files:
            f = open_safetensors(path)
            for name in f.keys():
                self.file[name], self.shape[name] = (path, f), tuple(f.get_slice(name).get_shape())

    def __contains__(self, name):
        return name in self.file

    def __iter__(self):
        return iter(list(self.file))

    def discard(self, name):
        """Leave `name` unread (a tied lm_head's stored copy)."""
        self.file.pop(name, None)
        self.shape.pop(name, None)

    def pop(self, name):
        """The tensor, read now; afterwards it is no longer here."""
        path, f = self.file.pop(name)
        del self.shape[name]
        try:
            return f.get_tensor(name)
        except Exception as e:  # SafetensorError: the file was cut or changed since it was opened
            raise InputError(f"{path}: tensor {name!r} is unreadable, truncated or damaged? ({e})") from None


def open_safetensors(path):
    """safe_open reading by pread, with a truncated or foreign file named in one line instead of a
    SafetensorError."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except Exception as e:  # SafetensorError: header too small / incomplete metadata / invalid JSON in header
        raise InputError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None


def read_safetensors(path) -> dict:
    """All tensors of one safetensors file (an adapter's), a truncated or foreign file named in one line."""
    tensors = StoredTensors([path])
    return {name: tensors.pop(name) for name in tensors}


def check_vocab(tokenizer_size: int, config: ModelConfig, tokenizer_name, model_name):
    """A tokenizer with ids beyond the embedding rows would fail mid-run with an IndexError; say so at load."""
    if tokenizer_size > config.vocab_size:
        raise InputError(f"tokenizer {tokenizer_name} has {tokenizer_size} tokens but model {model_name} has only "
                         f"{config.vocab_size} embedding rows (vocab_size): they do not belong together")


def load_weights(module: nn.Module, tensors: "StoredTensors", source, dtype, device, optional=()):
    """Move `tensors` into `module` by name, with a clear error for a missing, unexpected or misshapen tensor.
    Each is read, converted to `dtype` on `device` and its stored copy freed before the next is read."""
    expected = dict(module.state_dict())
    for name, want in expected.items():
        if name not in tensors:
            if name in optional:
                continue
            raise InputError(f"{source}: missing tensor {name!r}")
        if tensors.shape[name] != tuple(want.shape):
            raise InputError(f"{source}: tensor {name!r} has shape {tensors.shape[name]}, "
                             f"config expects {tuple(want.shape)}")
    unexpected = [k for k in tensors if k not in expected and "rotary_emb" not in k and k not in optional]
    if unexpected:
        raise InputError(f"{source}: unexpected tensors {unexpected[:5]} (is this the right architecture?)")
    state = {name: tensors.pop(name).to(device=device, dtype=dtype) for name in tensors if name in expected}
    module.load_state_dict(state, strict=False, assign=True)


def check_finite(tensors, source):
    """Raise InputError naming `source` and the first tensor holding a NaN or inf: a diverged or damaged
    checkpoint would otherwise be sampled and judged as if it were a model ('!!!!' answers, a win rate).

    tensors: a module (its parameters and buffers) or a dict name -> tensor. One pass where the tensors are (the
    GPU after loading): an aminmax per tensor, NaN-propagating and allocating nothing, then one sync for all.
    """
    if isinstance(tensors, nn.Module):
        tensors = dict(chain(tensors.named_parameters(), tensors.named_buffers()))
    bad = nonfinite(tensors.items())
    if bad:
        dtype = str(tensors[bad[0]].dtype).removeprefix("torch.")
        raise InputError(f"{source}: tensor {bad[0]!r} holds NaN or inf (as {dtype}): a diverged or damaged "
                         f"checkpoint, not a model to sample, train or judge with")


def nonfinite(named) -> list[str]:
    """The names of the tensors holding a NaN or inf, of (name, tensor) pairs: one aminmax per floating tensor
    where it is (NaN-propagating, allocating nothing), then one sync for all."""
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel() and not t.is_meta]
    if not named:
        return []
    with torch.no_grad():
        device = named[0][1].device
        ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float().to(device) for _, t in named])  # [n, 2]
        finite = ends.isfinite().all(dim=1).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def load_model(path_or_hub_id, dtype=torch.float32, device="cpu", check=True) -> CausalLM:
    """Load an HF-format Qwen2/Qwen2.5 (or Qwen3) causal LM from a dir or a hub id (dtype None: as stored).
    check: refuse weights with a NaN or inf (check_finite, on `device` in `dtype`)."""
    model_dir = resolve_model_dir(path_or_hub_id)
    config = load_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(config)
    tensors = read_safetensors_dir(model_dir)
    if config.tie_word_embeddings:
        tensors.discard("lm_head.weight")  # some checkpoints store the tied copy; the embedding is the truth
    load_weights(model, tensors, model_dir, dtype, device, optional=("lm_head.weight",))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if check:
        check_finite(model, model_dir)
    return model.eval()


def base_state_dict(model: nn.Module) -> dict:
    """The model's own weights (LoRA adapter tensors left out), contiguous, tied lm_head dropped like HF does."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".adapters." not in k}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_model(model: nn.Module, out_dir, tokenizer_from=None, dtype=None, architecture=None):
    """Write an HF-format dir: config.json + model.safetensors (+ tokenizer files copied from `tokenizer_from`, with
    the chat template and generation_config.json of what was trained: see Chat.save_for_export)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = base_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    saved_dtype = next(iter(state.values())).dtype
    config = model.config.to_hf(architecture)
    config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    with atomic_path(out_dir / "model.safetensors") as tmp:  # whole or absent, even after a kill
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.exists() and src.resolve() != (out_dir / name).resolve():
                with atomic_path(out_dir / name) as tmp:
                    shutil.copy(src, tmp)
        if (Path(tokenizer_from) / "tokenizer.json").exists():
            from nanoalign.chat import load_chat
            load_chat(tokenizer_from).save_for_export(out_dir)
    return out_dir


def matmul_params(model: nn.Module) -> int:
    """N of the 6N FLOPs estimate: every weight used in a matmul, lm_head included, the embedding lookup not."""
    n = sum(p.numel() for p in model.parameters())  # a tied weight is counted once: as lm_head
    if not model.config.tie_word_embeddings:
        n -= model.model.embed_tokens.weight.numel()
    return n


def flops_per_token(config: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM appendix B)."""
    return 6 * n_params + 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len

