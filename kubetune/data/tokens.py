"""Token counts with the model's own tokenizer, torch-free.

A model directory with a ``tokenizer.json`` (what ``save_pretrained`` writes for every fast
tokenizer) is read with the ``tokenizers`` library; its ``tokenizer_config.json`` (and an
older ``special_tokens_map.json``) names the special tokens, and ``chat_template.jinja`` or
the config's ``chat_template`` holds the chat template. An example is counted exactly as the
trainer encodes it (``kubetune.trainer.data.encode``): a BOS token when the tokenizer has one,
the prompt, the target and an EOS token; a chat row's prompt is the conversation before the
reply rendered through the model's chat template (which places its own special tokens, so no
BOS is added), rendered as transformers' ``apply_chat_template`` renders it (a sandboxed
jinja2 environment with ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, and the special
tokens as variables).

Without a tokenizer the count is the text length / 4 (``estimate_tokens``); the plan says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from kubetune.data.stats import DataError, Example, estimate_tokens

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: The special tokens a chat template sees as variables (transformers' special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class ModelTokenizer:
    """A model's tokenizer as the planner uses it: token counts of examples."""

    tokenizer: Any  # tokenizers.Tokenizer (untyped library)
    source: str
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def encode_lengths(self, texts: Sequence[str]) -> list[int]:
        """The number of tokens of each text, without special tokens added."""
        if not texts:
            return []
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def prompt_text(self, example: Example, source: str) -> str:
        """What comes before the target: the chat template's rendering of the conversation
        before the reply (with its generation prompt) for chat rows, else the prompt."""
        if example.messages and self.chat_template:
            return render_chat_template(
                self.chat_template,
                [{"role": r, "content": c} for r, c in example.messages[:-1]],
                self.special_tokens,
                f"{source} {example.where}",
            )
        return example.prompt

    def example_lengths(self, examples: Sequence[Example], source: str) -> list[int]:
        """Each example's length in tokens as the trainer encodes it."""
        prompts = [self.prompt_text(ex, source) for ex in examples]
        nonempty = [p for p in prompts if p]
        prompt_lengths = iter(self.encode_lengths(nonempty))
        targets = self.encode_lengths([ex.target for ex in examples])
        eos = 1 if self.eos_id is not None else 0
        out = []
        for ex, prompt, target in zip(examples, prompts, targets, strict=True):
            templated = bool(ex.messages and self.chat_template)
            bos = 1 if self.bos_id is not None and not templated else 0
            out.append(bos + (next(prompt_lengths) if prompt else 0) + target + eos)
        return out


def estimated_lengths(examples: Sequence[Example]) -> list[int]:
    """The fallback: characters / 4 per example."""
    return [estimate_tokens(ex.text) for ex in examples]


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else the config's chat_template (a string, or a list of named
    templates of which transformers uses "default")."""
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        for item in template:
            if isinstance(item, dict) and item.get("name") == "default":
                text = item.get("template")
                return text if isinstance(text, str) else None
    return None


def model_directory(model_source: str) -> Path | None:
    """The local directory a model source names (``file://`` or a path; a config.json's
    directory), or None (hub, ConfigMap, not there)."""
    if "://" in model_source and not model_source.startswith("file://"):
        return None
    path = Path(model_source.removeprefix("file://"))
    if path.is_file():
        path = path.parent
    return path if path.is_dir() else None


def load_tokenizer(directory: Path) -> tuple[ModelTokenizer | None, str]:
    """The tokenizer in a model directory, or None and why there is none."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None, f"no {TOKENIZER_FILE} in the model"
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a dependency of kubetune
        return None, "the tokenizers library is not installed"
    try:
        tokenizer = Tokenizer.from_file(str(path))
        config = {
            **_read_json(directory / SPECIAL_TOKENS_MAP_FILE),
            **_read_json(directory / TOKENIZER_CONFIG_FILE),
        }
        template = _chat_template(directory, config)
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        return None, f"its {TOKENIZER_FILE} cannot be read: {exc}"
    specials = {
        name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name)))
    }

    def token_id(name: str) -> int | None:
        text = specials.get(name)
        found = tokenizer.token_to_id(text) if text is not None else None
        return int(found) if found is not None else None

    return (
        ModelTokenizer(
            tokenizer=tokenizer,
            source=str(path),
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            chat_template=template,
            special_tokens=specials,
        ),
        "",
    )


def find_tokenizer(model_source: str) -> tuple[ModelTokenizer | None, str]:
    """The tokenizer of a local model (a directory, ``file://`` or its config.json), or
    None and why not."""
    directory = model_directory(model_source)
    if directory is None:
        return None, "the model is not local"
    return load_tokenizer(directory)


# ---- chat templates ---------------------------------------------------------------------------


@cache
def _compiled(template: str) -> Any:
    from jinja2 import TemplateError, ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant masks): renders its body."""

        tags = {"generation"}  # noqa: RUF012 - jinja2's own class attribute

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(
    template: str, messages: list[dict[str, str]], special_tokens: dict[str, str], where: str
) -> str:
    """The conversation as the model's chat template renders it, with the generation
    prompt; a template that refuses it is a DataError naming `where`."""
    from jinja2 import TemplateError

    try:
        rendered: str = _compiled(template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **special_tokens,
        )
    except TemplateError as exc:
        raise DataError(
            f"{where}: the model's chat template refuses this conversation ({exc})"
        ) from exc
    return rendered
