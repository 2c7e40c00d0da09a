"""LoRA: low-rank adapters on the decoder's linear layers, stacked by name, saved in PEFT's layout.

    names = add_lora(model, "default", r=16, alpha=32)    # wraps q/k/v/o/gate/up/down, freezes everything else
    print(describe(model))                                # LoRA r=16 on 168 modules: 8.8M trainable of 503M
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    with torch.no_grad(), adapters_disabled(model):        # the frozen base is the DPO reference, at no extra memory
        ref_hidden = model(ids, return_hidden=True)
    save_adapter(model, "default", "out/adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B")  # PEFT loads it
    save_model(merge_lora(model), "out/merged")             # a plain HF dir

A wrapped layer keeps the base `weight`/`bias` as its own parameters, so the state_dict keys stay
`model.layers.0.self_attn.q_proj.weight` and load_model/save_model work unchanged; the adapter tensors live under
`...q_proj.adapters.<name>.lora_{A,B}.weight`, which save_model skips. The adapters of a layer add up: round 2 of
iterative DPO trains a new adapter on top of round 1's frozen one, with `adapters_disabled(model, ["round2"])`
(base + round 1) as its reference. lm_head is never wrapped: small Qwen ties it to the embedding (PITFALLS #3).
"""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from nanoalign.errors import InputError
from nanoalign.jsonl import read_json
from nanoalign.model import FIELD_CHECKS, check_finite, load_model, read_safetensors, resolve_model_dir
from nanoalign.rundir import atomic_path, write_text

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json options that change the math; we load an adapter only when each is off/empty
UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save", "rank_pattern",
               "alpha_pattern", "layers_to_transform", "layer_replication", "exclude_modules", "target_parameters",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora")


class LoRAAdapter(nn.Module):
    """One low-rank update x -> B(A(dropout(x))) * alpha / r. B starts at zero, so a new adapter changes nothing."""

    def __init__(self, in_features, out_features, r, alpha, dropout=0.0, device=None, dtype=None):
        super().__init__()
        if r <= 0:
            raise InputError(f"LoRA rank must be positive, got {r}")
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        self.enabled = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)   # weight [r, in]
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)  # weight [out, r]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # [..., in] -> [..., out]
        x = self.dropout(x.to(self.lora_A.weight.dtype))  # the adapter may be kept in fp32 on a bf16 base
        return self.lora_B(self.lora_A(x) * self.scaling)  # scaled on the r-wide side: no [..., out] temporary

    def delta_weight(self):  # [out, in] fp32: what merging adds to the base weight
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


class LoRALinear(nn.Module):
    """An nn.Linear's own weight and bias plus named adapters; the output is base + every enabled adapter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight                     # [out, in], the same Parameter object as before
        self.register_parameter("bias", linear.bias)    # [out] or None, like nn.Linear
        self.adapters = nn.ModuleDict()

    def add_adapter(self, name, r, alpha, dropout=0.0):
        assert name not in self.adapters, f"adapter {name!r} already exists"
        # the adapter is what trains, so it is its own fp32 master copy, whatever the (frozen) base's dtype
        self.adapters[name] = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout,
                                          device=self.weight.device, dtype=torch.float32)

    def forward(self, x):  # [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        for adapter in self.adapters.values():
            if adapter.enabled:
                # in place: F.linear keeps no output for backward, and each [..., out] temporary costs memory (on
                # a CPU they also fragment the heap: 1-2 GiB of peak RSS in an 8-layer Qwen2.5-0.5B DPO step)
                y = y.add_(adapter(x).to(y.dtype))
        return y

    def to_linear(self, dtype=None) -> nn.Linear:
        """Fold every adapter (enabled or not) into the base weight, W += alpha/r * B @ A; a plain nn.Linear back.
        The sum is taken in fp32 and rounded once, to `dtype` (default: the base weight's)."""
        with torch.no_grad():
            delta = sum(adapter.delta_weight() for adapter in self.adapters.values())
            merged = (self.weight.float() + delta).to(dtype or self.weight.dtype)  # one rounding in bf16
            if merged.dtype == self.weight.dtype:
                merged = self.weight.copy_(merged)  # the same Parameter object as before
            else:
                merged = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = merged, self.bias
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# -----------------------------------------------------------------------------
# Adding, switching off, merging

def _linears(model) -> list:
    """(name, module) of every linear layer inside the decoder, plain or wrapped; names as in the state_dict."""
    return [(f"model.{n}", m) for n, m in model.model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]


def _lora_layers(model) -> dict:
    return {n: m for n, m in _linears(model) if isinstance(m, LoRALinear)}


def adapter_names(model) -> list:
    """The adapters in the model, oldest first."""
    return list(dict.fromkeys(name for layer in _lora_layers(model).values() for name in layer.adapters))


def _check_targets(targets) -> tuple:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if "lm_head" in targets:
        raise InputError("LoRA on lm_head is not supported: small Qwen ties it to the embedding (PITFALLS #3)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise InputError(f"unknown LoRA target(s) {unknown or targets}; valid targets: {list(TARGETS)} (--lora-targets)")
    return targets


def _add_adapter(model, name, module_names, r, alpha, dropout):
    """Wrap each named nn.Linear in a LoRALinear (once) and give it a new adapter `name`."""
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists (adapters: {adapter_names(model)})")
    for full_name in module_names:
        parent_name, child = full_name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if isinstance(layer, nn.Linear):
            layer = LoRALinear(layer)
            setattr(parent, child, layer)
        layer.add_adapter(name, r, alpha, dropout)
        layer.train(parent.training)  # new modules start in train mode: an eval model would get dropout


def _train_only(model, name):
    for param_name, p in model.named_parameters():
        p.requires_grad_(f".adapters.{name}." in param_name)


def add_lora(model, name="default", r=8, alpha=16, dropout=0.0, targets=TARGETS) -> list:
    """Add LoRA adapter `name` to every decoder linear layer named in `targets`; train only it.

    Every other parameter is frozen, earlier adapters included (they stay on: that is stacking).

    Returns:
        the wrapped modules' names, e.g. ["model.layers.0.self_attn.q_proj", ...]
    Raises:
        ValueError: unknown targets, lm_head, or an adapter name already in use.
    """
    targets = _check_targets(targets)
    names = [n for n, _ in _linears(model) if n.rsplit(".", 1)[-1] in targets]
    _add_adapter(model, name, names, r, alpha, dropout)
    _train_only(model, name)
    return names


@contextmanager
def adapters_disabled(model, names=None):
    """Switch off the named adapters (all if None) inside the block; their previous state comes back after.

    `with torch.no_grad(), adapters_disabled(model):` is the frozen base, the DPO reference at no extra memory.
    Run backward outside the block: activation checkpointing recomputes the forward with the flags of that moment.
    """
    names = [names] if isinstance(names, str) else names
    present = adapter_names(model)
    unknown = [n for n in names or () if n not in present]
    if unknown:  # a typo here would make the reference equal the policy, silently
        raise ValueError(f"no adapter(s) {unknown} in the model (adapters: {present})")
    adapters = [a for layer in _lora_layers(model).values() for n, a in layer.adapters.items()
                if names is None or n in names]
    before = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, enabled in zip(adapters, before):
            a.enabled = enabled


def merge_lora(model, dtype=None):
    """Fold every adapter into its base weight and put plain nn.Linear modules back; returns the model.

    dtype: the merged weights' dtype (default: each base weight's own); summed in fp32 either way.
    lm_head is never wrapped, so a tied model stays tied and `save_model` writes a plain HF dir.
    """
    for full_name, layer in _lora_layers(model).items():
        parent_name, child = full_name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, layer.to_linear(dtype))
    return model


# -----------------------------------------------------------------------------
# Parameters and logging

def lora_parameters(model, name) -> list:
    """The parameters of adapter `name` (lora_A and lora_B of every wrapped layer)."""
    params = [p for layer in _lora_layers(model).values() if name in layer.adapters
              for p in layer.adapters[name].parameters()]
    if not params:
        raise ValueError(f"no adapter {name!r} in the model (adapters: {adapter_names(model)})")
    return params


def trainable_parameters(model) -> list:
    """What the optimizer gets: every parameter that requires grad."""
    return [p for p in model.parameters() if p.requires_grad]


def _human(n) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def describe(model) -> str:
    """One line for the log: "LoRA r=8 on 168 modules: 4.4M trainable of 498M"."""
    layers = _lora_layers(model)
    total = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    counts = f"{_human(sum(p.numel() for p in trainable_parameters(model)))} trainable of {_human(total)}"
    if not layers:
        return f"no LoRA: {counts}"
    ranks = {n: a.r for layer in layers.values() for n, a in layer.adapters.items()}
    what = f"r={next(iter(ranks.values()))}" if len(ranks) == 1 else " + ".join(f"{n} r={r}" for n, r in ranks.items())
    return f"LoRA {what} on {len(layers)} modules: {counts}"


# -----------------------------------------------------------------------------
# PEFT-format adapter dirs: adapter_config.json + adapter_model.safetensors

def save_adapter(model, name, out_dir, base_model_name_or_path=None) -> Path:
    """Write adapter `name` as PEFT does, so `PeftModel.from_pretrained(hf_model, out_dir)` loads it.

    Tensor keys are PEFT's, without the adapter name: `base_model.model.<module>.lora_A.weight`.
    """
    layers = {n: layer.adapters[name] for n, layer in _lora_layers(model).items() if name in layer.adapters}
    if not layers:
        raise ValueError(f"no adapter {name!r} in the model (adapters: {adapter_names(model)})")
    first = next(iter(layers.values()))
    assert all((a.r, a.alpha, a.dropout_p) == (first.r, first.alpha, first.dropout_p) for a in layers.values())
    short = [t for t in TARGETS if any(n.endswith("." + t) for n in layers)]
    covered = [n for n, _ in _linears(model) if n.rsplit(".", 1)[-1] in short]
    # PEFT matches a short name against every layer of that name; full names when only some layers have it
    target_modules = short if sorted(covered) == sorted(layers) else sorted(layers)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=first.r, lora_alpha=first.alpha,
                  lora_dropout=first.dropout_p, target_modules=target_modules, bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
                  modules_to_save=None, base_model_name_or_path=base_model_name_or_path, revision=None,
                  layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
    tensors = {}
    for module_name, a in layers.items():
        tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = a.lora_A.weight.detach().contiguous().cpu()  # [r, in]
        tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = a.lora_B.weight.detach().contiguous().cpu()  # [out, r]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:  # whole or absent, even after a kill
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def _peft_matches(module_name, target_modules) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry matches the name or its dotted suffix."""
    if target_modules == "all-linear":
        return True  # every linear layer but the output one; we only look inside the decoder anyway
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked: LoRA, none of the options we do not implement, and the fields we use of the
    right type and range (as ModelConfig.from_hf checks config.json), so `"r": "eight"` is one line naming the file
    and field, not a shape error blamed on the weights."""
    config_file = Path(adapter_dir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {adapter_dir}")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise InputError(f"{config_file}: a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise InputError(f"{config_file}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    unsupported = {k: config[k] for k in UNSUPPORTED if config.get(k) not in (None, False, "none", {}, [])}
    if unsupported:
        raise InputError(f"{config_file}: unsupported LoRA option(s) {unsupported}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise InputError(f"{config_file}: missing field(s) {missing}")
    checks = {"r": FIELD_CHECKS[int], "lora_alpha": FIELD_CHECKS[float],
              "lora_dropout": (lambda v: v is None or type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
              "target_modules": (_is_target_modules, "a non-empty list of module names or a regular expression")}
    for field, (ok, want) in checks.items():
        if not ok(config.get(field)):
            raise InputError(f"{config_file}: field {field!r} must be {want}, got {config.get(field)!r}")
    return config


def _is_target_modules(value) -> bool:
    """PEFT's target_modules: a list of module names, or one regular expression matched against whole names."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(t, str) for t in value)
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


def load_adapter(model, path, name=None, trainable=False) -> list:
    """Load a PEFT-format LoRA adapter (ours or PEFT's; a dir or a hub id) into `model` as adapter `name`.

    Like add_lora, every other parameter is frozen; `trainable=False` freezes the new adapter too and drops its
    lora_dropout (dropout belongs to training; a frozen adapter is applied as is, in train mode too).

    Args:
        name: the adapter's name in the model, "default" if None
    Returns:
        the wrapped modules' names
    Raises:
        InputError: a tensor missing from adapter_model.safetensors, one that matches no module, one of the wrong
            shape, an unsupported config option
        ValueError: a name already in use
    """
    try:
        adapter_dir = resolve_model_dir(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter dir not found: {path}") from None
    config = read_adapter_config(adapter_dir)
    weights_file = adapter_dir / WEIGHTS_FILE
    if not weights_file.exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {adapter_dir} (only safetensors adapters are supported)")
    tensors = read_safetensors(weights_file)
    module_names = [n for n, _ in _linears(model) if _peft_matches(n, config["target_modules"])]
    if not module_names:
        raise InputError(f"{adapter_dir}: target_modules {config['target_modules']} match no decoder layer")
    r = config["r"]
    expected = {}  # key -> shape
    for n in module_names:
        layer = model.get_submodule(n)
        expected[f"{PEFT_PREFIX}{n}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{PEFT_PREFIX}{n}.lora_B.weight"] = (layer.out_features, r)
    for key, shape in expected.items():  # check everything before touching the model
        if key not in tensors:
            raise InputError(f"{weights_file}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise InputError(f"{weights_file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"model and r={r} expect {shape}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        hint = " (LoRA on lm_head/embeddings is not supported)" if any("lm_head" in k or "embed" in k
                                                                        for k in unexpected) else ""
        raise InputError(f"{weights_file}: unexpected tensors {unexpected[:5]}{hint}")
    check_finite(tensors, weights_file)
    name = name or "default"
    # a frozen adapter is part of the model, not something being trained: no dropout, or the train-mode policy
    # pass would differ from the eval-mode reference pass and round 2 would not start at ln 2
    dropout = config.get("lora_dropout") or 0.0 if trainable else 0.0
    _add_adapter(model, name, module_names, r, config["lora_alpha"], dropout)
    with torch.no_grad():
        for n in module_names:
            adapter = model.get_submodule(n).adapters[name]
            adapter.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"])
            adapter.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"])
    _train_only(model, name)
    if not trainable:
        for p in lora_parameters(model, name):
            p.requires_grad_(False)
    return module_names


def load_merged(model_path, adapters=(), dtype=torch.float32, device="cpu"):
    """A model with its adapters (in stacking order) folded into the weights, ready to sample from.

    Merging happens in fp32 before the cast to `dtype`, so a bf16 sampler sees the same weights a merged export
    would, and decoding pays for no extra LoRA matmuls. Only `dtype` ever reaches `device`: the merge runs on
    the CPU, on the weights as stored, one layer at a time in fp32 (a bf16 8B model never becomes 32 GB of fp32).
    Weights with a NaN or inf are refused (InputError naming the dir and tensor): each adapter's as it is read,
    the model's once, where it ends up (on `device`, in `dtype`, merged).
    """
    if not adapters:
        return load_model(model_path, dtype=dtype, device=device).eval()
    model = load_model(model_path, dtype=None, device="cpu", check=False)  # the checkpoint's own dtype(s)
    for i, path in enumerate(adapters):
        load_adapter(model, path, name=f"round{i}")
    merge_lora(model, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    check_finite(model, f"{model_path} with {' + '.join(map(str, adapters))} merged")
    return model
