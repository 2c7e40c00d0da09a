"""Exports behave like what was trained: training renders a model dir's own chat template (Qwen2.5 base and
Instruct differ in their default system prompt), an exported dir's template renders exactly the trained ids in
transformers, and HF generate stops at <|im_end|> where our sampler stops. The tokenizer dirs carry the two real
Qwen2.5 templates (tests/fixtures.py) on the toy tokenizer."""
import json
import shutil

import pytest
import torch

from nanoalign import toy
from nanoalign.chat import QWEN_SYSTEM, load_chat
from nanoalign.engine import generate
from nanoalign.model import CausalLM, ModelConfig, save_model
from tests.fixtures import QWEN25_BASE_TEMPLATE, QWEN25_INSTRUCT_TEMPLATE

CONVERSATIONS = [  # (messages, add_generation_prompt)
    ([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}], False),
    ([{"role": "user", "content": "What is 2 + 3?"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And 10 + 7?"}], True),
]
DIRS = {  # name: (template, where it is kept, the default system prompt it inserts)
    "base": (QWEN25_BASE_TEMPLATE, "tokenizer_config.json", "You are a helpful assistant."),
    "instruct": (QWEN25_INSTRUCT_TEMPLATE, "tokenizer_config.json", QWEN_SYSTEM),
    "base, chat_template.jinja": (QWEN25_BASE_TEMPLATE, "chat_template.jinja", "You are a helpful assistant."),
}


def tokenizer_dir(root, template, where):
    """The toy tokenizer with `template` in tokenizer_config.json, or only in chat_template.jinja (the layout newer
    transformers saves)."""
    out = toy.build_tokenizer(root)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if where == "tokenizer_config.json":
        config["chat_template"] = template
    else:
        (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {name: tokenizer_dir(root / str(i), template, where) for i, (name, (template, where, _)) in
            enumerate(DIRS.items())}


def hf_ids(model_dir, messages, gen):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(messages, add_generation_prompt=gen)[
        "input_ids"]


@pytest.mark.parametrize("name", DIRS)
def test_training_renders_the_dirs_own_template(dirs, name):
    """A Qwen2.5 base dir inserts "You are a helpful assistant.", an Instruct dir "You are Qwen, ...": training
    renders the same ids as the model's own template in transformers (it used to insert the Instruct prompt always)."""
    chat = load_chat(dirs[name])
    assert chat.default_system == DIRS[name][2]
    for messages, gen in CONVERSATIONS:
        assert chat.render(messages, add_generation_prompt=gen)[0] == hf_ids(dirs[name], messages, gen), messages


def tiny_model(chat, eos_token_id, seed=0):
    config = toy.tiny_config(512, bos_token_id=chat.endoftext_id, eos_token_id=eos_token_id)
    return CausalLM(ModelConfig.from_hf(config)).init_weights(seed=seed)


@pytest.mark.parametrize("name", DIRS)
def test_export_chats_as_trained(dirs, name, tmp_path):
    """The exported dir's chat template (tokenizer_config.json and chat_template.jinja) renders in transformers
    exactly the ids training rendered; for a real Qwen2.5 template it is that template, unchanged."""
    chat = load_chat(dirs[name])
    out = save_model(tiny_model(chat, chat.endoftext_id), tmp_path / "export", tokenizer_from=dirs[name])
    assert (out / "chat_template.jinja").read_text() == DIRS[name][0]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DIRS[name][0]
    for messages, gen in CONVERSATIONS:
        assert hf_ids(out, messages, gen) == chat.render(messages, add_generation_prompt=gen)[0], messages
    assert load_chat(out).default_system == chat.default_system  # the next stage trains as this one did


def test_export_of_a_dir_without_template(dirs, tmp_path):
    """No template at all: training inserts Qwen2.5-Instruct's default, and the export says so."""
    bare = shutil.copytree(dirs["instruct"], tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    chat = load_chat(bare)
    assert chat.default_system == QWEN_SYSTEM
    out = save_model(tiny_model(chat, chat.endoftext_id), tmp_path / "export", tokenizer_from=bare)
    messages, gen = CONVERSATIONS[0]
    assert hf_ids(out, messages, gen) == chat.render(messages, add_generation_prompt=gen)[0]


def bigram_model(chat, answer_id, after_id):
    """A tiny model whose next token depends on the current one only: <answer> after any ordinary token,
    <|im_end|> after <answer>, <after> after <|im_end|> (what a sampler that does not stop there goes on with).
    Its config.json keeps the base model's eos, <|endoftext|>, as an SFT export of Qwen2.5 base does."""
    model = tiny_model(chat, eos_token_id=chat.endoftext_id)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    with torch.no_grad():
        for layer in model.model.layers:  # attention and MLP run but add nothing to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[answer_id, 0], emb[answer_id, 1] = 0.0, 1.0
        emb[chat.im_end_id, 0], emb[chat.im_end_id, 2] = 0.0, 1.0
        head[answer_id, 0] = head[chat.im_end_id, 1] = head[after_id, 2] = 2.0  # x 8 after the final RMSNorm
    return model


def test_hf_generate_stops_where_our_sampler_stops(dirs, tmp_path):
    """generation_config.json of the export: eos [<|im_end|>, <|endoftext|>] and pad, so transformers' generate
    stops at <|im_end|> as our sampler does (with the base config's eos alone it went on past it)."""
    import transformers
    chat = load_chat(dirs["base"])
    answer_id, after_id = chat.encode("5")[0], chat.encode("7")[0]
    model = bigram_model(chat, answer_id, after_id)
    out = save_model(model, tmp_path / "export", tokenizer_from=dirs["base"])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == chat.endoftext_id
    gen_config = json.loads((out / "generation_config.json").read_text())
    assert gen_config["eos_token_id"] == [chat.im_end_id, chat.endoftext_id]
    assert gen_config["pad_token_id"] == chat.endoftext_id
    prompt = chat.render_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    ours = generate(model.eval(), [prompt], 6, chat.stop_ids, chat.pad_id)[0]
    assert ours == [answer_id, chat.im_end_id]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert ids == ours
