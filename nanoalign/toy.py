"""The built-in offline task: a tiny Qwen2-shaped model learns to name the largest number in a list.

Everything is produced by code, nothing is downloaded: a byte-level BPE tokenizer with Qwen's pre-tokenizer
and specials, an HF Qwen2 config.json, prompts, a rule-based reward, SFT demonstrations that are only sometimes
right (so SFT alone does not solve the task and DPO has something to fix) and UltraFeedback-style pairs.

    python -c "from nanoalign.toy import build_tokenizer; build_tokenizer('runs/toy/tokenizer')"
"""
import json
from pathlib import Path
import random
import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nanoalign.chat import ENDOFTEXT, IM_END, IM_START, QWEN25_CHAT_TEMPLATE, QWEN_SYSTEM
from nanoalign.errors import InputError

# Qwen2's pre-tokenizer split: \p{N} alone, so numbers are tokenised digit by digit (easy for a tiny model)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
TEMPLATES = [
    "Arrange the numbers {} in ascending order. What is the last number?",
    "What is the largest number among {}?",
    "Which of these numbers is the biggest: {}?",
    "Sort {} from smallest to largest. Which number comes last?",
    "Find the maximum of {}. Answer with the number only.",
]
CHAT_SENTENCES = [
    "Hello! How can I help you today?",
    "Thank you, that was very helpful.",
    "Please answer the question and explain your reasoning.",
    "Sure, here is a short answer.",
    "I am a helpful assistant. Ask me anything.",
    "What is the weather like today?",
    "Could you write a short poem about the sea?",
    "The quick brown fox jumps over the lazy dog.",
]


def _number_list(nums: list[int], rng: random.Random) -> str:
    """"3, 7, and 12" or "3, 7, 12"."""
    if rng.random() < 0.5:
        return ", ".join(map(str, nums))
    return ", ".join(map(str, nums[:-1])) + ", and " + str(nums[-1])


def make_prompt(rng: random.Random, high: int = 99, templates: list[str] = TEMPLATES) -> tuple[list[dict], str]:
    """A "largest number" question over 3-6 distinct numbers in 0..high (the demo uses high=9: learnable on a CPU),
    worded by one of `templates`.

    Returns:
        messages: [{"role": "user", "content": ...}] (no system message: Chat inserts Qwen's default one)
        answer: the largest number as a string, e.g. "89"
    """
    k = rng.randint(3, 6)
    # the largest is drawn first, uniformly, so a model cannot score by always naming a big number
    top = rng.randint(k - 1, high)
    nums = rng.sample(range(top), k - 1)
    nums.insert(rng.randint(0, k - 1), top)
    question = rng.choice(templates).format(_number_list(nums, rng))
    return [{"role": "user", "content": question}], str(max(nums))


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def check_prompt(prompt_messages: list[dict]):
    """Raise InputError unless reward() can grade answers to this prompt: its last user message lists numbers."""
    users = [m["content"] for m in prompt_messages if m["role"] == "user"]
    if not users or not _numbers(users[-1]):
        raise InputError("the toy reward cannot grade this prompt: its last user message has no numbers")


def reward(prompt_messages: list[dict], response: str) -> float:
    """Rule-based grade in [0, 1]; the answer is re-derived from the numbers in the last user message.

    1.0  exactly the largest number (surrounding whitespace ignored)
    0.5  the largest number is the only number in a longer answer ("The answer is 89.")
    0.1  some number of the list is given, but not (only) the largest one
    0.0  anything else, empty included
    """
    check_prompt(prompt_messages)
    question = next(m["content"] for m in reversed(prompt_messages) if m["role"] == "user")
    nums = _numbers(question)
    answer = max(nums)
    if response.strip() == str(answer):
        return 1.0
    given = set(_numbers(response))
    if given == {answer}:
        return 0.5
    return 0.1 if given & set(nums) else 0.0


def _mistake(messages: list[dict], rng: random.Random) -> str:
    """A plausible wrong answer (never the largest): mostly the seeds' failure, the number listed last ("what is
    the last number?" read literally), otherwise the first or the second-largest."""
    nums = _numbers(messages[-1]["content"])
    if nums[-1] != max(nums) and rng.random() < 0.75:
        return str(nums[-1])
    wrong = [n for n in (nums[-1], nums[0], sorted(nums)[-2]) if n != max(nums)]
    return str(rng.choice(wrong))


def sft_demo(rng: random.Random, p_correct: float = 0.3, high: int = 99) -> dict:
    """An SFT row {"prompt", "messages": [user, assistant]} whose answer is right with probability p_correct,
    else a plausible mistake, so SFT teaches the format but not the task."""
    messages, answer = make_prompt(rng, high)
    if rng.random() >= p_correct:
        answer = _mistake(messages, rng)
    return {"prompt": messages[0]["content"], "messages": messages + [{"role": "assistant", "content": answer}]}


def demonstrator(rng: random.Random, high: int = 99, p_habit: float = 0.7) -> dict:
    """An SFT row from a demonstrator who is right, with two habits, each taken with probability p_habit:
    a question about the number that comes "last" is read literally (the answer is the number listed last), and
    "What is the largest number among ...?" is answered in a sentence ("The answer is 9.": reward 0.5).
    A model trained on these knows the task, but its greedy answers keep both habits for preferences to fix."""
    messages, answer = make_prompt(rng, high)
    question = messages[0]["content"]
    if "last" in question and rng.random() < p_habit:
        answer = str(_numbers(question)[-1])
    elif question.startswith("What is the largest") and rng.random() < p_habit:
        answer = f"The answer is {answer}."
    return {"prompt": question, "messages": messages + [{"role": "assistant", "content": answer}]}


def preference_pair(rng: random.Random, high: int = 99, templates: list[str] = TEMPLATES) -> dict:
    """An UltraFeedback-binarized-style row: chosen is the right answer, rejected a plausible mistake.

    Returns:
        {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant],
         "score_chosen": float, "score_rejected": float}   scores are reward() values in [0, 1]
    """
    messages, answer = make_prompt(rng, high, templates)
    wrong = _mistake(messages, rng)
    return {
        "prompt": messages[0]["content"],
        "chosen": messages + [{"role": "assistant", "content": answer}],
        "rejected": messages + [{"role": "assistant", "content": wrong}],
        "score_chosen": reward(messages, answer),
        "score_rejected": reward(messages, wrong),
    }


def _corpus(n_prompts: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic training text for the tokenizer: task prompts and answers, chat roles, generic sentences."""
    rng = random.Random(seed)
    texts = CHAT_SENTENCES + ["The answer is"]
    for _ in range(n_prompts):  # as the chat format shows them, so roles and the system prompt get merges too
        messages, answer = make_prompt(rng)
        texts += ["system", QWEN_SYSTEM, "user", messages[0]["content"], "assistant", answer]
    return texts


def build_tokenizer(out_dir, vocab_size: int = 480) -> Path:
    """Train a byte-level BPE on toy text, append <|endoftext|>, <|im_start|>, <|im_end|> (in Qwen's order, after
    the regular vocab) and write tokenizer.json + tokenizer_config.json; same bytes on every build.

    Args:
        out_dir: created if missing.
        vocab_size: regular tokens (256 bytes + merges); the three specials come on top.
    Returns:
        out_dir as a Path.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([ENDOFTEXT, IM_START, IM_END])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "add_prefix_space": False,
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def tiny_config(vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None,
                **overrides) -> dict:
    """An HF Qwen2 config.json dict for a tiny model (hidden 64, 2 layers, 4 heads, 2 kv heads, tied embeddings).

    Args:
        vocab_size: embedding rows; may exceed the tokenizer's size (Qwen2.5: 151936 rows, 151665 tokens).
        bos_token_id, eos_token_id: e.g. chat.endoftext_id and chat.im_end_id.
        overrides: any other config.json field.
    """
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config
