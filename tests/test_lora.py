"""LoRA against hand-computed numbers, the merged and the base model, and PEFT itself (both directions)."""
import json

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

from conftest import make_hf_model_dir
from nanoalign.errors import InputError
from nanoalign.lora import (LoRALinear, adapter_names, adapters_disabled, add_lora, describe, load_adapter,
                            load_merged, lora_parameters, merge_lora, save_adapter, trainable_parameters)
from nanoalign.model import load_model, save_model

peft = pytest.importorskip("peft")
EXACT = dict(atol=0, rtol=0)
CLOSE = dict(atol=1e-5, rtol=0)
IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if torch.is_tensor(out) else out.logits


def randomise(model, name, seed, std=0.1):
    """Give adapter `name` random A and B, so it changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_lora_linear_by_hand():
    # W = [[1,2],[3,4]], b = [.5,-.5], A = [[1,1]], B = [[1],[2]], alpha/r = 2/1; x = [1,2]
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base)
    assert layer.weight is base.weight and layer.bias is base.bias
    layer.add_adapter("a", r=1, alpha=2)
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[5.5, 10.5]]), **EXACT)  # B = 0: the base alone
    with torch.no_grad():
        layer.adapters["a"].lora_A.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.adapters["a"].lora_B.weight.copy_(torch.tensor([[1.0], [2.0]]))
    # base [5.5, 10.5] + 2 * B (A x = 3) = [5.5 + 6, 10.5 + 12]
    torch.testing.assert_close(layer(x), torch.tensor([[11.5, 22.5]]), **EXACT)
    merged = layer.to_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, torch.tensor([[3.0, 4.0], [7.0, 8.0]]), **EXACT)  # W + 2 B A
    torch.testing.assert_close(merged(x), torch.tensor([[11.5, 22.5]]), **EXACT)


@pytest.mark.parametrize("grad", [False, True])
def test_adapter_adds_one_output_sized_temporary(grad):
    """A LoRA layer's forward holds its output plus one [tokens, out] temporary (B's product, added in place; the
    scaling is applied on the r-wide side): it held up to three, which at real shapes also fragmented the CPU heap
    (an 8-layer Qwen2.5-0.5B LoRA DPO step peaked 1-2 GiB higher). With gradients on, backward is unchanged."""
    from tests.fixtures import peak_rss_rise
    layer = LoRALinear(nn.Linear(64, 250_000, bias=False))
    layer.add_adapter("a", r=4, alpha=8)
    with torch.no_grad():
        layer.adapters["a"].lora_B.weight.normal_()
    x = torch.randn(100, 64, requires_grad=grad)  # output [100, 250000] fp32: 95.4 MiB
    with torch.set_grad_enabled(grad):
        rise, y = peak_rss_rise(lambda: layer(x))
    out = 100 * 250_000 * 4
    assert rise < 2.5 * out, rise / out
    a = layer.adapters["a"]
    expected = x @ layer.weight.T + (x @ a.lora_A.weight.T) @ a.lora_B.weight.T * 2.0
    torch.testing.assert_close(y, expected)
    if grad:
        y.square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        (x2 @ layer.weight.T + (x2 @ a.lora_A.weight.T) @ a.lora_B.weight.T * 2.0).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)


def test_dropout_only_on_the_adapter_path_and_only_in_training():
    layer = LoRALinear(nn.Linear(4, 3))
    layer.add_adapter("a", r=2, alpha=4, dropout=1.0)  # p = 1 drops every input to the adapter
    nn.init.ones_(layer.adapters["a"].lora_B.weight)
    x = torch.randn(5, 4)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer.train()(x), base, **EXACT)
    assert (layer.eval()(x) - base).abs().min() > 0


def test_init_is_identity_and_keys_unchanged(hf_model_dir):
    model = load_model(hf_model_dir)
    base_keys, base_logits = set(model.state_dict()), logits(model)
    torch.manual_seed(0)
    names = add_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 7 and names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert {k for k in model.state_dict() if ".adapters." not in k} == base_keys
    torch.testing.assert_close(logits(model), base_logits, **EXACT)  # B = 0
    q = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert q.scaling == 2.0 and q.lora_A.weight.shape == (4, 64) and q.lora_B.weight.shape == (64, 4)
    assert (q.lora_B.weight == 0).all() and q.lora_A.weight.std() > 0
    assert q.lora_A.weight.abs().max() <= 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt 5): bound 1/sqrt(fan_in)
    # 2 layers x r=4 x (in + out): q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+112 each, down 112+64
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * 4 * (128 + 96 + 96 + 128 + 3 * 176)
    total = sum(p.numel() for p in model.parameters())
    assert describe(model) == f"LoRA r=4 on 14 modules: 7.81K trainable of {total / 1e3:.3g}K"


def test_merge_disable_and_gradients(hf_model_dir):
    model = load_model(hf_model_dir)
    base_logits = logits(model)
    add_lora(model, r=4, alpha=8)
    randomise(model, "default", seed=1)
    lora_logits = logits(model)
    assert (lora_logits - base_logits).abs().max() > 1e-2
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), base_logits, **EXACT)
    torch.testing.assert_close(logits(model), lora_logits, **EXACT)  # switched back on
    # only the adapter trains, and only it gets gradients
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapters.default." in name), name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, name
    # activation checkpointing (non-reentrant, PITFALLS #4) with a frozen base still reaches the adapter
    grads = [p.grad.clone() for p in lora_parameters(model, "default")]
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    model(IDS).logsumexp(-1).mean().backward()
    for g, p in zip(grads, lora_parameters(model, "default")):
        torch.testing.assert_close(p.grad, g)
    model.eval()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any(".adapters." in k for k in model.state_dict())
    torch.testing.assert_close(logits(model), lora_logits, **CLOSE)


def test_save_load_round_trip(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    add_lora(model, r=4, alpha=8, dropout=0.05, targets=("q_proj", "v_proj", "down_proj"))
    randomise(model, "default", seed=2)
    out = save_adapter(model, "default", tmp_path / "adapter", base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    assert json.loads((out / "adapter_config.json").read_text()) == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "down_proj"], bias="none", fan_in_fan_out=False, inference_mode=True,
        init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None,
        base_model_name_or_path="Qwen/Qwen2.5-0.5B", revision=None, layers_to_transform=None, layers_pattern=None,
        rank_pattern={}, alpha_pattern={})
    saved = load_file(out / "adapter_model.safetensors")
    assert sorted(saved) == sorted(f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                                   for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB")
    down = model.model.layers[1].mlp.down_proj.adapters["default"]
    torch.testing.assert_close(saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
                               down.lora_B.weight, **EXACT)
    fresh = load_model(hf_model_dir)
    assert load_adapter(fresh, out) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                        "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    assert trainable_parameters(fresh) == []
    assert not any(m.training for m in fresh.modules())  # load_model's eval mode reaches the new dropout
    torch.testing.assert_close(logits(fresh), logits(model.eval()), **EXACT)
    loaded = fresh.model.layers[1].mlp.down_proj.adapters["default"]
    assert (loaded.r, loaded.alpha, loaded.dropout_p) == (4, 8, 0.0)  # loaded frozen: no dropout
    torch.testing.assert_close(loaded.lora_A.weight, down.lora_A.weight, **EXACT)
    again = load_model(hf_model_dir)
    load_adapter(again, out, name="resumed", trainable=True)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == [
        n for n, _ in again.named_parameters() if ".adapters.resumed." in n]


def test_peft_loads_our_adapter(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    add_lora(model, r=4, alpha=16)
    randomise(model, "default", seed=3)
    out = save_adapter(model, "default", tmp_path / "adapter", base_model_name_or_path=str(hf_model_dir))
    theirs = peft.PeftModel.from_pretrained(hf_model(hf_model_dir), out).eval()
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].lora_alpha == 16
    assert (logits(theirs) - logits(hf_model(hf_model_dir))).abs().max() > 1e-2  # the adapter did something
    torch.testing.assert_close(logits(model), logits(theirs), **CLOSE)


def test_we_load_peft_adapter(hf_model_dir, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["k_proj", "o_proj", "up_proj"])
    theirs = peft.get_peft_model(hf_model(hf_model_dir), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    model = load_model(hf_model_dir)
    assert len(load_adapter(model, tmp_path / "peft")) == 6
    assert model.model.layers[0].self_attn.o_proj.adapters["default"].scaling == 3.0
    torch.testing.assert_close(logits(model), logits(theirs.eval()), **CLOSE)


def test_stacked_rounds(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    base_logits = logits(model)
    add_lora(model, "round1", r=4, alpha=8)
    randomise(model, "round1", seed=4)
    round1_logits = logits(model)
    add_lora(model, "round2", r=2, alpha=4, targets=("q_proj", "v_proj", "up_proj"))
    assert adapter_names(model) == ["round1", "round2"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".adapters.round2." in n]
    torch.testing.assert_close(logits(model), round1_logits, **EXACT)  # round 2 starts as a no-op
    randomise(model, "round2", seed=5)
    both = logits(model)
    assert (both - round1_logits).abs().max() > 1e-2
    with adapters_disabled(model, ["round2"]):  # round 2's DPO reference: base + round 1
        torch.testing.assert_close(logits(model), round1_logits, **EXACT)
        with adapters_disabled(model):
            torch.testing.assert_close(logits(model), base_logits, **EXACT)
        torch.testing.assert_close(logits(model), round1_logits, **EXACT)
    torch.testing.assert_close(logits(model), both, **EXACT)
    assert describe(model).startswith("LoRA round1 r=4 + round2 r=2 on 14 modules: ")
    # each round saved on its own, loaded back in order
    save_adapter(model, "round1", tmp_path / "r1")
    save_adapter(model, "round2", tmp_path / "r2")
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj", "up_proj"]
    assert len(load_file(tmp_path / "r2" / "adapter_model.safetensors")) == 2 * 3 * 2
    fresh = load_model(hf_model_dir)
    load_adapter(fresh, tmp_path / "r1", name="round1")
    load_adapter(fresh, tmp_path / "r2", name="round2")
    torch.testing.assert_close(logits(fresh), both, **EXACT)
    # PEFT: round 2 on the base with round 1 merged in
    merged = merge_lora(load_model(hf_model_dir))
    load_adapter(merged, tmp_path / "r1", name="round1")
    save_model(merge_lora(merged), tmp_path / "base_plus_r1")
    theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base_plus_r1"), tmp_path / "r2").eval()
    torch.testing.assert_close(logits(theirs), both, **CLOSE)


def test_frozen_adapter_has_no_dropout(hf_model_dir, tmp_path):
    """An adapter trained with lora_dropout 0.1, loaded frozen (a stacked round), applies no dropout even in train
    mode: the policy pass of round 2 must equal its eval-mode reference pass. Loaded to keep training, it keeps it."""
    model = load_model(hf_model_dir)
    add_lora(model, "round1", r=4, alpha=8, dropout=0.1)
    randomise(model, "round1", seed=4)
    save_adapter(model, "round1", tmp_path / "r1")
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    frozen = load_model(hf_model_dir)
    load_adapter(frozen, tmp_path / "r1", name="round1", trainable=False)
    expected = logits(frozen.eval())
    torch.manual_seed(0)
    torch.testing.assert_close(logits(frozen.train()), expected, **EXACT)
    resumed = load_model(hf_model_dir)
    load_adapter(resumed, tmp_path / "r1", name="round1", trainable=True)
    torch.testing.assert_close(logits(resumed.eval()), expected, **EXACT)
    assert (logits(resumed.train()) - expected).abs().max() > 1e-3  # dropout on while it trains


@pytest.mark.parametrize("tied", [True, False])
def test_merged_export_keeps_tie(tmp_path, tied):
    src = make_hf_model_dir(tmp_path / "hf", tied=tied)
    model = load_model(src)
    add_lora(model)
    randomise(model, "default", seed=6)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not isinstance(model.lm_head, LoRALinear)
    ours = logits(model)
    merge_lora(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    out = save_model(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    torch.testing.assert_close(logits(hf_model(out)), ours, **CLOSE)
    torch.testing.assert_close(logits(load_model(out)), logits(model), **EXACT)


def test_clear_errors(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    with pytest.raises(ValueError, match="lm_head is not supported"):
        add_lora(model, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qproj'\]; valid targets: \['q_proj'"):
        add_lora(model, targets=("qproj",))
    add_lora(model, r=4)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        add_lora(model, r=4)
    with pytest.raises(ValueError, match=r"no adapter\(s\) \['defualt'\]"):
        with adapters_disabled(model, "defualt"):
            pass
    out = save_adapter(model, "default", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter dir not found"):
        load_adapter(load_model(hf_model_dir), tmp_path / "nope")
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(112, 3)}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"has shape \(112, 3\), model and r=4 expect \(112, 4\)"):
        load_adapter(load_model(hf_model_dir), out)
    save_file({k: v for k, v in tensors.items() if k != key}, out / "adapter_model.safetensors")
    fresh = load_model(hf_model_dir)
    with pytest.raises(InputError, match=f"missing tensor '{key}'"):
        load_adapter(fresh, out)
    assert adapter_names(fresh) == []  # nothing was wrapped on the way to the error
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
              out / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"unexpected tensors .*\(LoRA on lm_head/embeddings is not supported\)"):
        load_adapter(load_model(hf_model_dir), out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"unsupported LoRA option\(s\) \{'use_dora': True\}"):
        load_adapter(load_model(hf_model_dir), out)


def test_hub_id_goes_through_snapshot_download(hf_model_dir, tmp_path, monkeypatch):
    import huggingface_hub
    model = load_model(hf_model_dir)
    add_lora(model, r=2)
    randomise(model, "default", seed=7)
    out = save_adapter(model, "default", tmp_path / "adapter")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or str(out))
    fresh = load_model(hf_model_dir)
    load_adapter(fresh, "someone/qwen-lora")
    assert asked == ["someone/qwen-lora"]
    torch.testing.assert_close(logits(fresh), logits(model), **EXACT)


def test_adapters_stay_fp32_on_a_bf16_base(hf_model_dir):
    """A frozen bf16 base (no fp32 master copy needed) with fp32 adapters: same output as the fp32 base + adapter
    under bf16 autocast, up to bf16 rounding, and gradients land in fp32 adapter weights."""
    ids = torch.arange(24).view(2, 12)
    outs = []
    for base_dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = load_model(hf_model_dir, dtype=base_dtype)
        add_lora(model, "default", r=4, alpha=8)
        for p in lora_parameters(model, "default"):
            assert p.dtype == torch.float32 and p.requires_grad
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids).float()
        out.logsumexp(-1).mean().backward()
        grad = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight.grad
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=5e-2, rtol=5e-2)


class DeviceLog(torch.utils._python_dispatch.TorchDispatchMode):
    """(dtype, numel) of every tensor copied onto the `meta` device (our stand-in for a GPU) from elsewhere.
    Empty meta tensors, as in building a model skeleton on meta, hold no memory and are not counted."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sources = [a for a in args if torch.is_tensor(a) and a.device.type != "meta"]
        if sources and torch.is_tensor(out) and out.device.type == "meta":
            self.made.append((out.dtype, out.numel()))
        return out


def test_load_merged_puts_only_its_dtype_on_the_device(hf_model_dir, tmp_path):
    """Stacked adapters merged in fp32, but no fp32 weight ever reaches the device: every tensor created there is
    bf16 and they add up to the bf16 model once (the old path put the whole fp32 model there first). The weights
    equal merging everything in fp32 and rounding once."""
    model = load_model(hf_model_dir)
    add_lora(model, "r1", r=4, alpha=8)
    randomise(model, "r1", seed=7)
    save_adapter(model, "r1", tmp_path / "r1")
    add_lora(model, "r2", r=2, alpha=4, targets=("q_proj", "down_proj"))
    randomise(model, "r2", seed=8)
    save_adapter(model, "r2", tmp_path / "r2")
    fp32 = load_merged(hf_model_dir, [tmp_path / "r1", tmp_path / "r2"])
    with DeviceLog() as log:
        bf16 = load_merged(hf_model_dir, [tmp_path / "r1", tmp_path / "r2"], dtype=torch.bfloat16, device="meta")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {dtype for dtype, _ in log.made} == {torch.bfloat16}
    assert sum(n for _, n in log.made) == sum(p.numel() for p in bf16.parameters())
    on_cpu = load_merged(hf_model_dir, [tmp_path / "r1", tmp_path / "r2"], dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()}
    for k, v in on_cpu.state_dict().items():
        torch.testing.assert_close(v, expected[k], **EXACT)
    assert (fp32.model.layers[0].self_attn.q_proj.weight - load_model(hf_model_dir).model.layers[0].self_attn
            .q_proj.weight).abs().max() > 1e-3  # the adapters are in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_merged_peak_cuda_memory_is_the_bf16_model(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    add_lora(model, "r1", r=4, alpha=8)
    randomise(model, "r1", seed=7)
    save_adapter(model, "r1", tmp_path / "r1")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    merged = load_merged(hf_model_dir, [tmp_path / "r1"], dtype=torch.bfloat16, device="cuda")
    size = sum(p.numel() * p.element_size() for p in merged.parameters())
    assert torch.cuda.max_memory_allocated() - start <= size * 1.1 + 2 ** 20
