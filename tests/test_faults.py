"""Cases of the fault-campaign replay (QA, /work/qa/harness.py) that still fail on main, as small tests: each names
the harness case it comes from. They fail until the owning area fixes them."""

from nanoalign.data import split_holdout
from nanoalign.errors import InputError
from tests.fixtures import run_script


def test_holdout_by_content_never_leaves_train_empty_in_silence():
    """N01: a small set upsampled (2 conversations x 50 copies) with --eval-frac 0.5: holding out by content takes
    every copy of each held-out conversation, here all of them. train_sft.py then died in pack() with `max() arg is
    an empty sequence`. split_holdout must either keep some training examples or say so in one line."""
    examples = [{"messages": [{"role": "user", "content": c}]} for c in ("a", "b")] * 50
    try:
        train, evals = split_holdout(examples, 0.5, seed=0)
    except InputError as e:
        assert "--eval-frac" in str(e)
        return
    assert train, f"{len(evals)} held out and no training example left, without a word"

def test_pairs_chat_template_not_utf8_is_one_line(tmp_path):
    """S08: a --template file that is not UTF-8 ends gen_pairs_chat.py with a UnicodeDecodeError traceback; bad
    input is one line naming the file (nothing is asked: the URL is never reached)."""
    template = tmp_path / "t.txt"
    template.write_bytes(b"Write two answers to {prompt} \xff\xfe as JSON")
    proc = run_script("gen_pairs_chat.py", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--template", template,
                      "--prompts", tmp_path / "none.jsonl", "--out", tmp_path / "out", check=False, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(template) in proc.stderr.strip().splitlines()[-1], proc.stderr
