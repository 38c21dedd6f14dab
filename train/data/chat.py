"""Chat templates: a conversation rendered as segments, only the assistant turns trained on.

The template is, in order: ``data.chat_template`` (a ``.jinja`` file, or ``builtin``), else the
``chat_template`` of the ``tokenizer_config.json`` next to the tokenizer, else the built-in one:

    <|system|>\\n{content}\\n   <|user|>\\n{content}\\n   <|assistant|>\\n{content}\\n

where only an assistant's ``{content}\\n`` is trained on. A Jinja template (Hugging Face's convention:
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``) needs the optional ``chat`` extra
(jinja2), imported only here. Its assistant spans are found by rendering prefixes: the text that
``messages[:k+1]`` adds to ``messages[:k]`` with the generation prompt is message k's trained part.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data.formats import Segment


class ChatTemplate:
    """Renders ``messages`` (a list of ``{role, content}``) into ``(text, trained)`` segments."""

    def __init__(self, jinja_source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = jinja_source
        self._template = None
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        if jinja_source is not None:
            try:
                import jinja2.sandbox
            except ImportError as e:
                raise ImportError(
                    "a Jinja chat template needs jinja2: pip install 'mla-parallel[chat]' (or set "
                    "data.chat_template=builtin)"
                ) from e
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(jinja_source)

    @classmethod
    def resolve(cls, chat_template: str | None, tokenizer_path: str | None) -> ChatTemplate:
        """The template named by ``data.chat_template``, the tokenizer's, or the built-in one."""
        if chat_template == "builtin":
            return cls()
        if chat_template is not None:
            path = Path(chat_template)
            if not path.is_file():
                raise ValueError(
                    f"data.chat_template={chat_template!r}: no such file (expected a .jinja "
                    "file or 'builtin')"
                )
            return cls(path.read_text())
        if tokenizer_path is not None:
            config = Path(tokenizer_path).parent / "tokenizer_config.json"
            if config.is_file():
                settings = json.loads(config.read_text())
                source = settings.get("chat_template")
                if isinstance(source, str):
                    tokens = {k: _token_text(settings.get(k)) for k in ("bos_token", "eos_token")}
                    return cls(source, **tokens)
        return cls()

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )

    def segments(self, messages: list[dict]) -> list[Segment]:
        if self._template is None:
            return _builtin(messages)
        out, done = [], ""
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self._render(messages[:k], add_generation_prompt=True)
                out.append((self._after(done, header), False))
                done = header
            full = self._render(messages[: k + 1], add_generation_prompt=False)
            out.append((self._after(done, full), message["role"] == "assistant"))
            done = full
        return [s for s in out if s[0]]

    @staticmethod
    def _after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ValueError(
                "data.chat_template: the template does not render a conversation prefix by prefix, so its "
                "assistant turns cannot be located; use data.chat_template=builtin or another template"
            )
        return text[len(prefix) :]


def _builtin(messages: list[dict]) -> list[Segment]:
    out: list[Segment] = []
    for m in messages:
        trained = m["role"] == "assistant"
        out += [(f"<|{m['role']}|>\n", False), (m["content"] + "\n", trained)]
    return out


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise(message: str):
    raise ValueError(f"data.chat_template: {message}")
