"""The toy task: reward values, demos, pairs, deterministic tokenizer, HF-loadable tokenizer and config."""
import random
import re
import subprocess
import sys

import pytest

from nanoalign.chat import load_chat
from nanoalign.toy import TEMPLATES, build_tokenizer, demonstrator, make_prompt, preference_pair, reward, sft_demo, tiny_config

Q = [{"role": "user", "content": "Arrange the numbers 34, 7, 89, 12, and 45 in ascending order. What is the last number?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


@pytest.mark.parametrize("response,expected", [
    ("89", 1.0), ("  89\n", 1.0),
    ("The answer is 89.", 0.5), ("89!", 0.5),
    ("45", 0.1), ("7", 0.1), ("89 or 45", 0.1),
    ("", 0.0), ("   ", 0.0), ("100", 0.0), ("890", 0.0), ("I do not know", 0.0),
])
def test_reward_values(response, expected):
    assert reward(Q, response) == expected


def test_reward_uses_last_user_message():
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Largest of 1, 2, 3?"},
             {"role": "assistant", "content": "3"}, {"role": "user", "content": "What is the largest number among 5, 60, 4?"}]
    assert reward(convo, "60") == 1.0 and reward(convo, "3") == 0.0


def test_make_prompt():
    rng = random.Random(0)
    sizes = set()
    for _ in range(300):
        messages, answer = make_prompt(rng)
        assert [m["role"] for m in messages] == ["user"]
        nums = [int(n) for n in re.findall(r"\d+", messages[0]["content"])]
        assert 3 <= len(nums) <= 6 and len(set(nums)) == len(nums) and all(0 <= n <= 99 for n in nums)
        assert answer == str(max(nums)) and reward(messages, answer) == 1.0
        sizes.add(len(nums))
    assert sizes == {3, 4, 5, 6}
    assert make_prompt(random.Random(7)) == make_prompt(random.Random(7))


def test_sft_demo_accuracy():
    def accuracy(p, n=2000):
        rng = random.Random(1)
        rows = [sft_demo(rng, p) for _ in range(n)]
        assert all(r["messages"][0]["content"] == r["prompt"] for r in rows)
        scores = [reward(r["messages"][:1], r["messages"][1]["content"]) for r in rows]
        assert set(scores) <= {1.0, 0.1}  # right, or a plausible mistake taken from the list
        return sum(s == 1.0 for s in scores) / n

    assert accuracy(0.0) == 0.0 and accuracy(1.0) == 1.0
    assert 0.27 < accuracy(0.3) < 0.33


def test_demonstrator_habits():
    rng = random.Random(2)
    rows = [demonstrator(rng, high=9, p_habit=0.7) for _ in range(3000)]
    kinds = {"right": 0, "literal": 0, "sentence": 0}
    for r in rows:
        question, answer = r["prompt"], r["messages"][1]["content"]
        nums = [int(n) for n in re.findall(r"\d+", question)]
        if answer == str(max(nums)):
            kinds["right"] += 1
        elif "last" in question and answer == str(nums[-1]):  # only a "last" question is read literally
            kinds["literal"] += 1
        else:  # only "What is the largest number among ...?" is answered in a sentence, with the right number
            assert question.startswith("What is the largest") and answer == f"The answer is {max(nums)}."
            assert reward(r["messages"][:1], answer) == 0.5
            kinds["sentence"] += 1
    # 2 of 5 wordings ask for the "last" number: 0.4 x 0.7 x P(the last listed is not the largest ~ 0.78); 1 of 5 x 0.7
    assert 0.19 < kinds["literal"] / len(rows) < 0.25 and 0.12 < kinds["sentence"] / len(rows) < 0.16


def test_prompt_templates():
    rng = random.Random(4)
    rows = [preference_pair(rng, 9, TEMPLATES[:2]) for _ in range(200)]
    assert {r["prompt"].split(" ")[0] for r in rows} == {"Arrange", "What"}
    assert all(r["score_chosen"] == 1.0 and r["score_rejected"] == 0.1 for r in rows)


def test_preference_pair():
    row = preference_pair(random.Random(3))
    assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    assert row["chosen"][0] == row["rejected"][0] == {"role": "user", "content": row["prompt"]}
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["user", "assistant"]
    assert (row["score_chosen"], row["score_rejected"]) == (1.0, 0.1)
    assert row["chosen"][1]["content"] != row["rejected"][1]["content"]


def test_tokenizer_deterministic(tmp_path, tok_dir):
    # in-process and in a fresh process (Rust HashMaps are seeded per process)
    build_tokenizer(tmp_path / "a")
    code = f"import sys; sys.path.insert(0, '.'); from nanoalign.toy import build_tokenizer; build_tokenizer({str(tmp_path / 'b')!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        ref = (tok_dir / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == ref and (tmp_path / "b" / name).read_bytes() == ref


def test_tokenizer_numbers_and_size(tok_dir):
    chat = load_chat(tok_dir)
    assert 300 <= chat.vocab_size <= 500
    for n in list(range(100)) + [12345, 907]:
        ids = chat.encode(str(n))
        assert [chat.decode([i]) for i in ids] == list(str(n))  # one token per digit
        assert chat.decode(ids) == str(n)
    text = "Arrange the numbers 34, 7, 89, 12, and 45 in ascending order."
    assert chat.decode(chat.encode(text)) == text
    assert chat.decode(chat.encode("<|im_end|>"), skip_special_tokens=False) == "<|im_end|>"
    assert chat.encode("<|im_end|>") == [chat.im_end_id]


def test_transformers_loads_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    chat = load_chat(tok_dir)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (chat.im_end_id, chat.endoftext_id, chat.vocab_size)
    text = Q[0]["content"]
    assert hf(text, add_special_tokens=False).input_ids == chat.encode(text)


def test_tiny_config_builds_hf_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = tiny_config(448, bos_token_id=409, eos_token_id=411)
    assert (cfg["architectures"], cfg["model_type"], cfg["vocab_size"]) == (["Qwen2ForCausalLM"], "qwen2", 448)
    assert tiny_config(448, num_hidden_layers=1)["num_hidden_layers"] == 1
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # embed 448*64; per layer q 64*64+64, k and v 64*32+32 each, o 64*64, mlp 3*64*176, 2 norms 64; final norm 64
    per_layer = 4160 + 2 * 2080 + 4096 + 3 * 64 * 176 + 128
    assert sum(p.numel() for p in model.parameters()) == 448 * 64 + 2 * per_layer + 64 == 121408


def test_prompt_check_before_loading_a_backend():
    """reward.prompt_check(spec) says what a backend needs from a prompt without loading it: the toy rule needs
    numbers in the last user message (else reward() has nothing to take the max of); the others take any prompt."""
    from nanoalign.reward import prompt_check
    check = prompt_check("toy")
    check([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
           {"role": "user", "content": "What is the largest number among 3, 12, 7?"}])
    for bad in ([{"role": "user", "content": "What is the largest number among 3, 12, 7?"},
                 {"role": "user", "content": "Tell me a joke."}],
                [{"role": "system", "content": "Count to 3."}]):
        with pytest.raises(ValueError, match="the toy reward cannot grade this prompt"):
            check(bad)
        with pytest.raises(ValueError, match="the toy reward cannot grade this prompt"):
            reward(bad, "3")
    assert prompt_check("http://127.0.0.1:1/v1") is None
    assert prompt_check("Skywork/Skywork-Reward-V2-Qwen3-0.6B") is None  # nothing downloaded to say so
