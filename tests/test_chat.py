"""Chat rendering: exact Qwen2.5 strings, masks built while rendering, errors. Uses the toy tokenizer (offline)."""
import pytest

from nanoalign.chat import Chat, load_chat
from nanoalign.toy import build_tokenizer

SYS = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CONVO = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 10 + 7?"},
    {"role": "assistant", "content": "It is 17."},
]
EXPECTED = (
    f"<|im_start|>system\n{SYS}<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n5<|im_end|>\n"
    "<|im_start|>user\nAnd 10 + 7?<|im_end|>\n"
    "<|im_start|>assistant\nIt is 17.<|im_end|>\n"
)
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}] + CONVO
EXPECTED_WITH_SYSTEM = "<|im_start|>system\nBe brief.<|im_end|>\n" + EXPECTED[EXPECTED.index("<|im_start|>user"):]
CASES = [  # (messages, add_generation_prompt)
    (CONVO, False),
    (WITH_SYSTEM, False),
    (CONVO[:3], True),
    (WITH_SYSTEM[:2], True),
    (CONVO[:2] + [{"role": "system", "content": "Now in French."}] + CONVO[2:], False),  # later system: plain turn
    ([{"role": "user", "content": "héllo wörld 😀\n\n  spaced  "}, {"role": "assistant", "content": "\nok 😀"}], False),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


@pytest.fixture(scope="module")
def chat(tok_dir):
    return load_chat(tok_dir)


def runs(chat, ids, mask, value):
    """Decoded text of each maximal run of positions where mask == value."""
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [1 - value]):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(chat.decode(cur, skip_special_tokens=False))
            cur = []
    return out


def test_special_ids(chat):
    v = chat.vocab_size
    assert (chat.endoftext_id, chat.im_start_id, chat.im_end_id) == (v - 3, v - 2, v - 1)  # Qwen's order, last
    assert chat.pad_id == chat.endoftext_id
    assert chat.stop_ids == (chat.im_end_id, chat.endoftext_id)


def test_format_literal(chat):
    assert chat.format(CONVO) == EXPECTED
    assert chat.format(WITH_SYSTEM) == EXPECTED_WITH_SYSTEM
    assert chat.format(CONVO[:1], add_generation_prompt=True) == (
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    no_default = Chat(chat.tokenizer, default_system=None)
    assert no_default.format(CONVO[:2]) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"


@pytest.mark.parametrize("messages,gen", CASES)
def test_format_matches_transformers_template(tok_dir, chat, messages, gen):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert chat.format(messages, add_generation_prompt=gen) == expected
    ids, mask = chat.render(messages, add_generation_prompt=gen)
    assert len(ids) == len(mask)
    assert chat.decode(ids, skip_special_tokens=False) == expected


def test_render_ids_match_whole_string_tokenisation(tok_dir, chat):
    # segments are tokenised separately; for ordinary content that equals tokenising the whole string
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for messages, gen in CASES[:5]:
        ids, _ = chat.render(messages, add_generation_prompt=gen)
        assert ids == hf(chat.format(messages, gen), add_special_tokens=False).input_ids


def test_mask_exact_spans(chat):
    ids, mask = chat.render(CONVO)
    assert runs(chat, ids, mask, 1) == ["5<|im_end|>", "It is 17.<|im_end|>"]
    assert runs(chat, ids, mask, 0) == [
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd 10 + 7?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    assert sum(mask) == len(chat.encode("5")) + len(chat.encode("It is 17.")) + 2
    trained_ends = [i for i, (t, m) in enumerate(zip(ids, mask)) if t == chat.im_end_id and m]
    assert len(trained_ends) == 2 and all(ids[i + 1:i + 2] == chat.encode("\n") and mask[i + 1] == 0 for i in trained_ends)
    assert all(m == 0 for t, m in zip(ids, mask) if t == chat.im_start_id)


def test_mask_with_system_and_show(chat):
    ids, mask = chat.render(WITH_SYSTEM)
    assert runs(chat, ids, mask, 1) == ["5<|im_end|>", "It is 17.<|im_end|>"]
    assert chat.show(ids, mask) == EXPECTED_WITH_SYSTEM.replace("5<|im_end|>", "[[5<|im_end|>]]").replace(
        "It is 17.<|im_end|>", "[[It is 17.<|im_end|>]]")


def test_generation_prompt_and_response(chat):
    prompt = CONVO[:3]
    ids, mask = chat.render(prompt, add_generation_prompt=True)
    header = [chat.im_start_id] + chat.encode("assistant\n")
    assert ids[-len(header):] == header and mask[-len(header):] == [0] * len(header)
    assert mask[:len(mask) - len(header)] == chat.render(prompt)[1]  # earlier assistant turn still trained
    assert set(chat.render(CONVO[:1], add_generation_prompt=True)[1]) == {0}
    assert chat.render_prompt(prompt) == ids
    assert chat.render_response("It is 17.") == chat.encode("It is 17.") + [chat.im_end_id]
    assert chat.render_response("It is 17 bec", finished=False) == chat.encode("It is 17 bec")  # cut: no end token
    # prompt + response is exactly the full rendering minus its final "\n"; the response is the trained part
    full_ids, full_mask = chat.render(CONVO)
    newline = chat.encode("\n")
    assert full_ids == ids + chat.render_response("It is 17.") + newline
    assert full_mask[len(ids):] == [1] * len(chat.render_response("It is 17.")) + [0] * len(newline)


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], r"message 1: field 'role'"),
    ([{"role": "user"}], r"message 0: field 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], r"message 1: field 'content'"),
    (["hi"], r"message 0"),
    ([], "empty"),
])
def test_bad_messages_raise(chat, messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render(messages)
    with pytest.raises(ValueError, match=match):
        chat.format(messages)


def test_load_chat_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_chat(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_chat(tmp_path / "missing" / "deeper")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_chat("./runs/does-not-exist")
