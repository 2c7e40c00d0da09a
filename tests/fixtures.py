"""Shared helpers for the script-level tests: a tiny toy setup on disk, and running the scripts as a user would.

    from tests.fixtures import cached_toy_setup, run_script, read_metrics, read_weights

    @pytest.fixture(scope="session")
    def toy(tmp_path_factory):
        return cached_toy_setup(tmp_path_factory)          # built once per session, shared by every test file

    def test_x(toy, tmp_path):
        run_script("train_sft.py", "--model", toy.model, "--data", toy.sft, "--out", tmp_path / "out", nproc=2)
"""
import json
import os
import random
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from nanoalign.jsonl import write_jsonl  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


# Qwen2.5's chat templates as published, verbatim: the "chat_template" value of tokenizer_config.json (line 198) of
# https://huggingface.co/Qwen/Qwen2.5-0.5B (base, revision 060db6499f32faf8b98477b0a26969ef7d8b9987) and
# https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct (revision 7ae557604adf67be50417f59c2c2f167def9a775), the JSON
# string written as a Python literal (the escapes mean the same in both).
QWEN25_BASE_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
QWEN25_INSTRUCT_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

@dataclass(frozen=True)
class ToySetup:
    root: Path
    tokenizer: Path  # tokenizer.json + tokenizer_config.json
    model: Path  # HF Qwen2 dir (config.json, model.safetensors, tokenizer files), random init
    sft: Path  # JSONL of toy.sft_demo rows
    prefs: Path  # JSONL of toy.preference_pair rows
    vocab_size: int  # embedding rows (the tokenizer has fewer tokens, as on Qwen2.5)


def make_toy_setup(root, n_sft=64, n_pairs=32, seed=0, vocab_size=512, **config_overrides) -> ToySetup:
    """Tokenizer, a random tiny Qwen2 model dir, SFT and preference JSONL under `root` (about 2 s on CPU).

    Args:
        n_sft, n_pairs: rows of sft.jsonl and prefs.jsonl (drawn with random.Random(seed)).
        vocab_size: embedding rows; must exceed the toy tokenizer's size (~412).
        config_overrides: any tiny_config field, e.g. num_hidden_layers=1.
    """
    from nanoalign import toy
    from nanoalign.chat import load_chat
    from nanoalign.model import CausalLM, ModelConfig, save_model

    root = Path(root)
    tok_dir = toy.build_tokenizer(root / "tokenizer")
    chat = load_chat(tok_dir)
    assert chat.vocab_size <= vocab_size, f"tokenizer has {chat.vocab_size} tokens, more than {vocab_size} rows"
    config = toy.tiny_config(vocab_size, bos_token_id=chat.endoftext_id, eos_token_id=chat.im_end_id,
                             **config_overrides)
    model = CausalLM(ModelConfig.from_hf(config)).init_weights(seed=seed)
    model_dir = save_model(model, root / "base", tokenizer_from=tok_dir)
    rng = random.Random(seed)
    sft = write_jsonl(root / "sft.jsonl", [toy.sft_demo(rng) for _ in range(n_sft)])
    prefs = write_jsonl(root / "prefs.jsonl", [toy.preference_pair(rng) for _ in range(n_pairs)])
    return ToySetup(root, tok_dir, model_dir, sft, prefs, vocab_size)


_CACHE: dict = {}


def cached_toy_setup(tmp_path_factory, **kwargs) -> ToySetup:
    """make_toy_setup, built once per pytest session for each distinct kwargs (treat the files as read-only)."""
    key = tuple(sorted(kwargs.items()))
    if key not in _CACHE:
        _CACHE[key] = make_toy_setup(tmp_path_factory.mktemp("toy"), **kwargs)
    return _CACHE[key]


def run_script(script, *args, nproc=1, timeout=300, check=True, threads=1):
    """Run a repo script as a user would: `python script ...`, or torchrun with nproc processes (gloo on CPU).

    Args:
        args: command-line arguments (Paths and numbers are turned into strings).
        nproc: > 1 runs `python -m torch.distributed.run --standalone --nproc_per_node=nproc` (a free port).
        check: raise with the stderr tail when the exit status is not 0.
        threads: OMP_NUM_THREADS of each process. 1 by default: tiny models gain nothing from more, and on a
            busy 2-core machine a second spinning OpenMP thread makes a step 10x slower.
    Returns:
        subprocess.CompletedProcess with text stdout and stderr.
    """
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        cmd = [sys.executable, script]
    cmd += [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(out_dir) -> list[dict]:
    """The rows of <out_dir>/metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def read_weights(model_dir) -> dict:
    """Every tensor of an HF model dir (or adapter dir with model.safetensors / adapter_model.safetensors)."""
    from safetensors.torch import load_file
    model_dir = Path(model_dir)
    files = [p for p in (model_dir / "model.safetensors", model_dir / "adapter_model.safetensors") if p.exists()]
    assert files, f"no safetensors file in {model_dir}"
    return load_file(str(files[0]))


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_stopped_on_nan(proc, out_dir, max_bad_steps=3):
    """A run that diverged: non-zero exit with one `error: step N: non-finite ...` line and no traceback, the last
    max_bad_steps rows of metrics.jsonl skipped (loss null: strict JSON, no NaN token), no final/, and every
    checkpoint it did save finite. Returns the metrics rows."""
    import re

    import torch
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    m = re.fullmatch(rf"error: step (\d+): non-finite loss \(nan\) or gradient norm \(nan\) for {max_bad_steps} steps in "
                     rf"a row \(--max-bad-steps {max_bad_steps}\): stopped, nothing saved; lower --lr or resume from an "
                     r"earlier checkpoint", last)
    assert m, last

    def no_nan(token):
        raise AssertionError(f"{token} in metrics.jsonl")
    rows = [json.loads(line, parse_constant=no_nan) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == int(m.group(1))
    assert all(r["loss"] is None and r.get("skipped") for r in rows[-max_bad_steps:]), rows
    assert not (Path(out_dir) / "final").exists()
    for ckpt in Path(out_dir).glob("ckpt-*"):
        assert all(torch.isfinite(t).all() for t in read_weights(ckpt).values()), ckpt
    return rows


@contextmanager
def json_server(handle):
    """A real HTTP server on 127.0.0.1 (a free port) in a thread, for endpoint stubs.

    handle(path, headers, body) -> (status, payload) answers each POST, whose body is JSON; payload is JSON-able,
    or bytes sent as they are. Yields the base URL, http://127.0.0.1:<port>/v1.
    """
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = handle(self.path, self.headers, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


@contextmanager
def serving(server):
    """Run a socketserver server (bound to 127.0.0.1) in a thread; yields http://127.0.0.1:<port>/v1."""
    server.handle_error = lambda *a: None  # a client that timed out closes its socket: not a test failure
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.01), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def tmpfs(path, size, readonly=False):
    """A real tmpfs of `size` (e.g. "64k") mounted at `path` for the test's duration: a disk that fills up, or a
    read-only one. Skips the test where no tmpfs can be mounted (needs root / CAP_SYS_ADMIN)."""
    import pytest
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def peak_rss_rise(fn):
    """(bytes the process's peak RSS rose above its RSS before fn() ran, fn's result). Linux: VmHWM, reset through
    /proc/self/clear_refs. Buffers of 32 MiB or more are mapped and unmapped by glibc one by one, so with them the
    rise is what fn held at once."""
    import re

    def kib(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    out = fn()
    return (kib("VmHWM") - before) * 1024, out
