"""Our decoder against transformers' Qwen2/Qwen3 on the same HF dirs: logits, left padding, KV cache, round trip."""
import json

import pytest
import torch
import transformers

from conftest import make_hf_model_dir
from nanoalign.errors import InputError
from nanoalign.model import KVCache, ModelConfig, load_config, load_model, save_model

TOL = dict(atol=1e-4, rtol=0)


def hf_logits(model_dir, ids, mask=None):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("variant", [dict(tied=True), dict(tied=False), dict(model_type="qwen3", head_dim=24),
                                     dict(model_type="qwen3", attention_bias=True)])
def test_logits_match_transformers(tmp_path, variant):
    model_dir = make_hf_model_dir(tmp_path / "m", **variant)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model = load_model(model_dir)
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(model_dir, ids)
    assert ours.shape == ref.shape == (2, 12, 300)
    torch.testing.assert_close(ours, ref, **TOL)


def test_left_padded_batch_matches_transformers(hf_model_dir):
    ids = torch.randint(0, 297, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded by 4, row 2 by 7
    mask[2, :7] = 0
    ids[mask == 0] = 299
    model = load_model(hf_model_dir)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    ref = hf_logits(hf_model_dir, ids, mask)
    real = mask.bool()
    assert not ours.isnan().any()
    torch.testing.assert_close(ours[real], ref[real], **TOL)
    # a padded row gives the same logits as that sequence alone
    with torch.no_grad():
        alone = model(ids[2:3, 7:])
    torch.testing.assert_close(ours[2, 7:], alone[0], **TOL)


def test_save_round_trip_through_transformers(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir)
    out = save_model(model, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(hf_model_dir, ids), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), model(ids), atol=0, rtol=0)


def test_untied_round_trip_keeps_lm_head(tmp_path):
    src = make_hf_model_dir(tmp_path / "m", tied=False)
    out = save_model(load_model(src), tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.arange(20).view(2, 10)
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(src, ids), atol=0, rtol=0)


def test_tied_weights_are_shared(hf_model_dir):
    model = load_model(hf_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_kv_cache_prefill_and_decode_equal_full_forward(hf_model_dir):
    """Two sequences of different lengths, prefilled right-padded into slots 2 and 0 of a 3-slot cache, then decoded
    one token per step for every slot at once: the logits are the full forward's, whatever is in the other slots."""
    model = load_model(hf_model_dir)
    ids = torch.randint(0, 297, (2, 11), generator=torch.Generator().manual_seed(3))
    lens = [6, 4]  # prompt lengths: row 1's prefill is padded with 2 tokens
    with torch.no_grad():
        full = [model(ids[r:r + 1])[0] for r in range(2)]  # [11, V] each
        cache = KVCache(model.config, 3, 16, torch.float32, "cpu")
        cache.k[1].fill_(1e4)  # stale garbage from an earlier sequence must never be attended to
        cache.rows = torch.tensor([2, 0])
        padded = torch.where(torch.arange(6) < torch.tensor(lens)[:, None], ids[:, :6], 7)
        pre = model(padded, position_ids=torch.arange(6).expand(2, 6), kv_cache=cache)
        cache.rows, cache.span = None, 10  # decode every slot (positions < 10); slot 1 idles at position 0
        for r, n in enumerate(lens):
            torch.testing.assert_close(pre[r, :n], full[r][:n], **TOL)
        pos = torch.tensor([lens[1], 0, lens[0]])  # slot 0 holds row 1, slot 2 row 0
        for step in range(4):
            tok = torch.stack([ids[1, pos[0]], torch.tensor(5), ids[0, pos[2]]])
            logits = model(tok[:, None], position_ids=pos[:, None], kv_cache=cache)[:, 0]  # [3, V]
            torch.testing.assert_close(logits[2], full[0][pos[2]], **TOL)
            torch.testing.assert_close(logits[0], full[1][pos[0]], **TOL)
            pos = pos + torch.tensor([1, 0, 1])


def test_hidden_states_times_lm_head_are_logits(hf_model_dir):
    model = load_model(hf_model_dir)
    ids = torch.arange(16).view(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(ids, return_hidden=True)), model(ids))


def test_gradient_checkpointing_same_gradients(hf_model_dir):
    ids = torch.arange(24).view(3, 8)
    grads = []
    for ckpt in (False, True):
        model = load_model(hf_model_dir).train()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_clear_errors(tmp_path, hf_model_dir):
    with pytest.raises(FileNotFoundError, match="model dir not found"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_config(bad)
    # a checkpoint missing a tensor, and one whose shapes disagree with its config
    from safetensors.torch import load_file, save_file
    tensors = load_file(hf_model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_model_dir / "model.safetensors")
    with pytest.raises(InputError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(hf_model_dir)
    config = json.loads((hf_model_dir / "config.json").read_text())
    config["intermediate_size"] = 100
    (hf_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        load_model(hf_model_dir)


def test_sharded_checkpoint(tmp_path):
    src = make_hf_model_dir(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "sharded")(ids), load_model(src)(ids), atol=0, rtol=0)


def test_qwen25_configs_parse():
    # Qwen2.5-0.5B's and -7B's config.json fields (tied/untied, GQA 14/2 and 28/4)
    small = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                     use_sliding_window=False, sliding_window=32768, torch_dtype="bfloat16"))
    big = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                   tie_word_embeddings=False, rms_norm_eps=1e-6))
    assert (small.head_dim, small.attention_bias, small.tie_word_embeddings) == (64, True, True)
    assert (big.head_dim, big.tie_word_embeddings) == (128, False)


def test_hub_id_goes_through_snapshot_download(hf_model_dir, monkeypatch):
    """A hub id is fetched with huggingface_hub.snapshot_download (weights, configs, tokenizer files), then loaded."""
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(hf_model_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("Qwen/Qwen2.5-0.5B")
    assert calls == [("Qwen/Qwen2.5-0.5B", ["*.json", "*.safetensors", "*.jinja", "merges.txt"])]
    assert model.config.vocab_size == 300
    with pytest.raises(FileNotFoundError, match="model dir not found: ./missing/dir"):
        load_model("./missing/dir")  # a path that does not exist is never sent to the hub


LOAD_RSS = """import sys, torch
from pathlib import Path
from nanoalign.model import load_model
from tests.fixtures import peak_rss_rise
load_model(sys.argv[2])  # a tiny model first: the first load's own one-time costs (~77 MiB) are not the weights
rise, model = peak_rss_rise(lambda: load_model(sys.argv[1], dtype=torch.float32))
print(rise / 2**20, 'model.safetensors' in Path('/proc/self/maps').read_text())
"""


def test_loading_holds_one_stored_tensor_at_a_time(tmp_path):
    """A bf16 checkpoint loads into fp32 at the fp32 weights plus about one stored tensor, not plus the whole file,
    and no checkpoint stays mapped after loading (an fp32 one's pages stayed resident: beside its merged LoRA
    weights in eval_winrate.py, 0.3 GiB of the scale test's 2.54 GiB). Each load in a fresh process."""
    import subprocess
    import sys

    from nanoalign import toy
    from nanoalign.model import CausalLM
    from tests.fixtures import ROOT
    config = ModelConfig.from_hf(toy.tiny_config(4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                                 num_attention_heads=8, num_key_value_heads=2))
    model = CausalLM(config).init_weights(seed=0)
    fp32_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # 131 MiB; the largest bf16 tensor is 8
    tiny = save_model(CausalLM(ModelConfig.from_hf(toy.tiny_config(64))).init_weights(seed=0), tmp_path / "tiny")
    for dtype in (torch.bfloat16, torch.float32):
        path = save_model(model, tmp_path / str(dtype), dtype=dtype)
        out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(path), str(tiny)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
        rise, mapped = float(out[0]), out[1] == "True"
        assert not mapped, f"{dtype}: model.safetensors still mapped after load_model"
        # measured 134 MiB for both; the whole bf16 file beside its fp32 copy would be 1.5 x fp32_mib
        assert fp32_mib < rise < 1.15 * fp32_mib, (dtype, rise, fp32_mib)
