"""Qwen2.5 chat format: render conversations to token ids plus the mask of trained tokens.

The mask is built while rendering, segment by segment, so it can never drift from the ids:

    <|im_start|>system\\n{system}<|im_end|>\\n        mask 0
    <|im_start|>user\\n{question}<|im_end|>\\n        mask 0
    <|im_start|>assistant\\n                          mask 0  (header)
    {answer}<|im_end|>                                mask 1  (content and its end-of-turn token)
    \\n                                               mask 0

    chat = load_chat("Qwen/Qwen2.5-0.5B")      # or a local dir holding tokenizer.json
    ids, mask = chat.render(messages)
    print(chat.show(ids, mask))                 # trained spans wrapped in [[ ]]
"""
from datetime import datetime
import json
from pathlib import Path

from tokenizers import Tokenizer

from nanoalign.errors import InputError
from nanoalign.jsonl import read_json

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

# Qwen2.5's chat_template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), verbatim. Chat.format reproduces its
# no-tools branch; toy.build_tokenizer writes it so transformers' apply_chat_template can cross-check us.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)



def chat_template(default_system: str | None = QWEN_SYSTEM) -> str:
    """Qwen2.5's chat template with `default_system` as the system prompt it inserts when a conversation has none
    (None: it inserts none): the template that renders exactly what Chat(tokenizer, default_system) renders. With
    the Instruct default it is QWEN25_CHAT_TEMPLATE itself; with "You are a helpful assistant." it is the template
    of the Qwen2.5 base models, character for character."""
    if default_system is None:
        parts = (f"'<|im_start|>system\\n{QWEN_SYSTEM}<|im_end|>\\n'", f"'{QWEN_SYSTEM}'")
        template = QWEN25_CHAT_TEMPLATE
        for part in parts:
            assert template.count(part) == 1, part
            template = template.replace(part, "''")
        return template
    # a jinja string literal, unescaped by jinja as Python's unicode-escape
    literal = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return QWEN25_CHAT_TEMPLATE.replace(QWEN_SYSTEM, literal)


def read_chat_template(model_dir) -> str | None:
    """The chat template of an HF dir: tokenizer_config.json["chat_template"], else chat_template.jinja."""
    model_dir = Path(model_dir)
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = read_json(config).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else None


def compile_chat_template(template: str):
    """A jinja2 Template in the sandbox transformers' apply_chat_template uses: immutable, trim_blocks and
    lstrip_blocks, loop controls, and its helpers raise_exception, strftime_now and a tojson that keeps non-ASCII."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def template_default_system(template: str, source="chat template") -> str | None:
    """The system prompt a chat template inserts before a conversation that has none (None: it inserts none),
    read by rendering it on a one-message conversation, as transformers would.

    Raises:
        InputError: the template fails on a plain user message.
    """
    import jinja2
    try:
        text = compile_chat_template(template).render(messages=[{"role": "user", "content": "?"}],
                                                      add_generation_prompt=False)
    except jinja2.TemplateError as e:
        raise InputError(f"{source}: the chat template fails on a plain user message: {e}") from None
    head = f"{IM_START}system\n"
    if text.startswith(head) and IM_END in text:
        return text[len(head):text.index(IM_END)]
    return None


class Chat:
    """A `tokenizers.Tokenizer` plus Qwen2.5's chat format (no tools).

    Args:
        tokenizer: must contain <|endoftext|>, <|im_start|> and <|im_end|> (every Qwen2/2.5/3 tokenizer does).
        default_system: system prompt inserted when the first message is not a system message, as Qwen2.5's
            template does; None inserts nothing.
    """

    def __init__(self, tokenizer: Tokenizer, default_system: str | None = QWEN_SYSTEM):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.endoftext_id, self.im_start_id, self.im_end_id = (self._special_id(t) for t in (ENDOFTEXT, IM_START, IM_END))
        self.pad_id = self.endoftext_id
        self.stop_ids = (self.im_end_id, self.endoftext_id)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # specials by id, never by encoding their text; headers and "\n" are encoded once
        self._header = {role: [self.im_start_id] + self.encode(role + "\n") for role in ROLES}
        self._newline = self.encode("\n")

    def _special_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise InputError(f"tokenizer has no {token} token: not a Qwen-style chat tokenizer")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _turns(self, messages: list[dict]) -> list[tuple[str, str]]:
        """Validated (role, content) pairs, default system prompt first where the template inserts it.

        Raises:
            InputError: empty conversation, a message that is not a dict, unknown role, missing/non-string content.
        """
        if not messages:
            raise InputError("empty conversation: no messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InputError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
            if m.get("role") not in ROLES:
                raise InputError(f"message {i}: field 'role' must be one of {ROLES}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise InputError(f"message {i}: field 'content' must be a string, got {type(m.get('content')).__name__}")
            turns.append((m["role"], m["content"]))
        if turns[0][0] != "system" and self.default_system is not None:
            turns.insert(0, ("system", self.default_system))
        return turns

    def format(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The exact string of Qwen2.5's chat template (tokenizer.apply_chat_template(..., tokenize=False))."""
        text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in self._turns(messages))
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of format(messages) and a mask that is 1 on each assistant content and its <|im_end|>.

        Every assistant turn of a multi-turn conversation is trained; system and user turns, the
        `<|im_start|>assistant\\n` headers and the "\\n" after each <|im_end|> are not (the model never has to
        produce them: generation starts after the header and stops at <|im_end|>).

        Segments (header, content, "\\n") are tokenised separately, which mirrors inference, where the model
        continues after the generation prompt. So decode(ids) == format(messages) always, while ids can differ
        from tokenising the whole formatted string, but only where a merge would cross a segment boundary
        (e.g. content that starts with "\\n").

        Returns:
            ids, mask: two lists of equal length.
        """
        ids, mask = [], []

        def add(tokens, trained):
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        for role, content in self._turns(messages):
            trained = int(role == "assistant")
            add(self._header[role], 0)
            add(self.encode(content), trained)
            add([self.im_end_id], trained)
            add(self._newline, 0)
        if add_generation_prompt:
            add(self._header["assistant"], 0)
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Ids of the conversation so far plus the `<|im_start|>assistant\\n` generation prompt."""
        return self.render(messages, add_generation_prompt=True)[0]

    def render_response(self, text: str, finished: bool = True) -> list[int]:
        """A response as the model should emit it: render_prompt(p) + render_response(r) equals
        render(p + [assistant r]) without its final "\\n". An unfinished response (cut at a token limit) gets no
        <|im_end|>: training must not teach the model to stop where it was only cut off."""
        return self.encode(text) + ([self.im_end_id] if finished else [])

    def save_for_export(self, out_dir):
        """Make an exported HF dir (tokenizer files already copied) chat as this Chat trained it: its chat template
        (tokenizer_config.json and chat_template.jinja) renders exactly what render() renders, and HF generate /
        vLLM stop where our sampler stops (generation_config.json: eos <|im_end|> and <|endoftext|>, pad
        <|endoftext|>), whatever the base model's own config says (a base Qwen2.5 stops only at <|endoftext|>)."""
        out_dir = Path(out_dir)
        template = chat_template(self.default_system)
        (out_dir / "chat_template.jinja").write_text(template)
        config_file = out_dir / "tokenizer_config.json"
        if config_file.exists():
            config = read_json(config_file)
            config.update(chat_template=template, eos_token=IM_END)
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        gen_file = out_dir / "generation_config.json"
        gen = read_json(gen_file) if gen_file.exists() else {}
        gen.update(eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id)
        gen_file.write_text(json.dumps(gen, indent=2) + "\n")

    def show(self, ids, mask) -> str:
        """Debug view: the decoded text (specials included) with trained spans wrapped in [[ ]]."""
        assert len(ids) == len(mask), f"{len(ids)} ids but {len(mask)} mask values"
        out, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or mask[i] != mask[start]:
                text = self.decode(ids[start:i], skip_special_tokens=False)
                out.append(f"[[{text}]]" if mask[start] else text)
                start = i
        return "".join(out)


FROM_TEMPLATE = "from the dir's chat template"  # load_chat's default for default_system


def load_chat(path_or_hub_id, default_system: str | None = FROM_TEMPLATE) -> Chat:
    """Chat from tokenizer.json in a local dir (or the file itself), else from a hub id like "Qwen/Qwen2.5-0.5B".

    Args:
        default_system: the system prompt inserted when a conversation has none. By default the one the dir's own
            chat template inserts (Qwen2.5-Instruct: "You are Qwen, created by Alibaba Cloud. You are a helpful
            assistant.", Qwen2.5 base: "You are a helpful assistant.", none for a template that inserts none), so
            training renders what the model's template renders; Qwen2.5-Instruct's for a dir without a template.
    Raises:
        FileNotFoundError: a local dir without tokenizer.json, or a name that is neither a local path nor
            a reachable hub repo.
    """
    path = Path(path_or_hub_id)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path.parent}")
    elif not path.is_file():
        from nanoalign.model import is_hub_id
        name = str(path_or_hub_id)
        if not is_hub_id(name):
            raise FileNotFoundError(f"{name}: no such directory or file (and not a hub id like 'Qwen/Qwen2.5-0.5B')")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "tokenizer.json"))
        except Exception as e:  # offline, no such repo, no such file: one line, not a 40-line traceback
            raise FileNotFoundError(f"{name}: not a local dir and tokenizer.json not available from the hub "
                                    f"({type(e).__name__})") from e
        for extra in ("tokenizer_config.json", "chat_template.jinja"):  # where the template may be
            try:
                hf_hub_download(name, extra)
            except Exception:
                pass
    if default_system is FROM_TEMPLATE:
        template = read_chat_template(path.parent)
        default_system = QWEN_SYSTEM if template is None else template_default_system(template, str(path.parent))
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for malformed JSON or a foreign format
        raise InputError(f"{path}: not a readable tokenizer.json ({e})") from None
    return Chat(tokenizer, default_system=default_system)
