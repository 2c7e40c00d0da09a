import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def make_hf_model_dir(out_dir, *, vocab_size=300, tied=True, model_type="qwen2", head="CausalLM", seed=0,
                      **overrides):
    """A tiny random HF Qwen2 (or Qwen3) model saved with safetensors by transformers itself: the reference.

    head: "CausalLM", or "SequenceClassification" for a reward model (pass num_labels and pad_token_id).
    """
    import transformers
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 1)
    cfg.update(overrides)
    family = "Qwen3" if model_type == "qwen3" else "Qwen2"
    config = getattr(transformers, f"{family}Config")(**cfg)
    cls = getattr(transformers, f"{family}For{head}")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias path observable
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if head == "SequenceClassification":
            model.score.weight.mul_(50)  # scores of order 1, so 1e-4 is a real tolerance
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


@pytest.fixture
def hf_model_dir(tmp_path):
    return make_hf_model_dir(tmp_path / "hf")


@pytest.fixture(scope="session", autouse=True)
def tokenised_data_cache(tmp_path_factory):
    """Scripts run by the tests cache tokenised datasets in a session dir, not in ~/.cache/nanoalign."""
    os.environ["NANOALIGN_CACHE"] = str(tmp_path_factory.mktemp("nanoalign-cache"))
