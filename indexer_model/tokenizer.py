"""The tokenizer and chat template of an HF-format folder, with `tokenizers` + jinja2 only.

Importing transformers costs ≈ 2 s on our CPU machine; this reads the same files (tokenizer.json,
tokenizer_config.json, chat_template.jinja) and renders the template the way transformers does.
"""

import json
from datetime import datetime
from pathlib import Path

from dsarag.base.errors import ModelError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_WORD_JOINER = "\u2060"  # invisible; splits a control-token string so that it is read as plain text


class ChatTokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        tokenizer_path = folder / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ModelError(
                f"{tokenizer_path}: missing; the model folder needs a fast tokenizer (tokenizer.json)", folder
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {
            key: _token_text(config.get(key)) for key in _SPECIAL_TOKEN_KEYS if config.get(key)
        }
        self.chat_template = _chat_template(folder, config)
        # Strings that the tokenizer turns into control tokens (<|im_start|>, <tool_call>, …), longest first.
        self.control_strings = sorted(
            {
                token.content
                for token in self.tokenizer.get_added_tokens_decoder().values()
                if len(token.content) > 1
            },
            key=len,
            reverse=True,
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, nothing is added around it."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ModelError(
                "the model has no chat template (tokenizer_config.json / chat_template.jinja); use an instruct model"
            )
        safe = [
            message | {"content": self.as_plain_text(message.get("content") or "")} for message in messages
        ]
        return self.chat_template.render(
            messages=safe, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def as_plain_text(self, text: str) -> str:
        """`text` with every control-token string broken by an invisible joiner: a document or question that
        contains `<|im_start|>system` stays text and cannot open a turn of its own (see SECURITY.md)."""
        for control in self.control_strings:
            if control in text:
                text = text.replace(control, control[0] + _WORD_JOINER + control[1:])
        return text

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _token_text(value: str | dict) -> str:
    return value["content"] if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict):  # noqa: ANN202 - a jinja2.Template, or None
    template_path = folder / "chat_template.jinja"
    source = template_path.read_text() if template_path.is_file() else config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return _compile(source) if source else None


def _compile(source: str):  # noqa: ANN202 - jinja2.Template
    """Compile like transformers: sandboxed, trim/lstrip blocks, loop controls, unescaped `tojson`."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, **kwargs: object) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)
