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


def test_endpoint_map_raises_the_failure_not_a_stopped_worker():
    """E03/E05/E07 (a regression of 712a647): a 401 from the server, 16 items, 8 in flight. The failing worker now
    stops the endpoint itself, so other workers' futures end in Stopped before map picks `the first failed future`
    in submission order: the run then ends in a bare `nanoalign.endpoint.Stopped` traceback instead of the 401's
    one line (seen in 1 run of 3 to 4 of gen_pairs_chat.py). map must raise the failure, never a Stopped."""
    from nanoalign.endpoint import Endpoint, EndpointError
    from tests.fixtures import json_server

    with json_server(lambda path, headers, body: (401, {"error": "bad key"})) as url:
        endpoint = Endpoint(url + "/chat/completions", "QA_NO_KEY", timeout=5, retries=0, concurrency=8)
        for _ in range(20):
            try:
                endpoint.map(lambda i: endpoint.post({"i": i}), range(16))
            except EndpointError as e:
                assert "HTTP 401" in str(e)
            else:
                raise AssertionError("no error from a server that answers 401")
