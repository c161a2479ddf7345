"""How long a prompt is for the model, and whether its tokenizers can read it at all.

Which tokenizer limits the prompt and which call argument sets its length are the pipeline's facts
(`PipelineSpec.text_tokenizer`, `.text_length_argument`); nothing here knows a model family. The
server and the CLI both refuse a prompt over the limit rather than letting the pipeline truncate it:
a silently shortened prompt gives an image of another text.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

from catrt.errors import ConfigError
from catrt.pipeline import PipelineSpec
from catrt.pipeline_spec import call_default


@dataclass(frozen=True)
class TextLimit:
    """The prompt's limit in tokens of `tokenizer` (the pipeline attribute), and the call argument fixing it."""

    tokens: int
    tokenizer: str
    argument: str | None


def text_limit(pipe: Any, spec: PipelineSpec, length: int | None = None) -> TextLimit:
    """The limit a call of `pipe` applies: `length` (a build's), else the pipeline's default length.

    Where the pipeline has no length argument, the tokenizer's own `model_max_length` is the limit.
    """
    name = spec.text_tokenizer if getattr(pipe, spec.text_tokenizer, None) is not None else "tokenizer"
    argument = spec.text_length_argument if name == spec.text_tokenizer else None
    if argument is not None:
        tokens = length or call_default(pipe, argument)
    else:
        tokenizer = getattr(pipe, name)
        tokens = tokenizer.model_max_length
    return TextLimit(int(tokens), name, argument)


def check_text_length(pipe: Any, spec: PipelineSpec, length: int | None) -> None:
    """Refuse a build's text length (`max_sequence_length`) the pipeline cannot take: one without a length
    argument (its tokenizer fixes the length), or a length over what that tokenizer reads (T5: 512), which
    the pipeline would otherwise pad to and run the text encoder on. None (the pipeline's default) is fine."""
    if length is None:
        return
    argument = spec.text_length_argument
    if argument is None or argument not in inspect.signature(pipe.__call__).parameters:
        raise ConfigError(
            f"{type(pipe).__name__} takes no text length: its tokenizer reads {text_limit(pipe, spec).tokens} tokens; "
            f"drop max_sequence_length (--max-sequence-length)",
            field="max_sequence_length", value=length,
        )
    longest = getattr(getattr(pipe, spec.text_tokenizer, None), "model_max_length", None)
    if isinstance(longest, int) and length > longest:
        # Worded as SD3 and FLUX refuse it themselves, for the pipelines (PixArt) that do not.
        raise ConfigError(
            f"{type(pipe).__name__} refused this build's settings: `{argument}` cannot be greater than {longest} "
            f"but is {length}; change the build flags",
            field="max_sequence_length", value=length,
        )


class PromptReader:
    """Counts a prompt's tokens and checks every tokenizer of the pipeline can read it.

    Holds private copies of the tokenizers: HF's Rust tokenizers refuse concurrent use, and the
    worker thread uses the pipeline's own while requests are checked on another thread.
    """

    def __init__(self, pipe: Any, limit: TextLimit) -> None:
        self.limit = limit
        components = getattr(pipe, "components", {}) or {}
        self._tokenizers = {
            name: copy.deepcopy(value)
            for name, value in components.items()
            if name.startswith("tokenizer") and value is not None
        }
        self._counter = self._tokenizers.get(limit.tokenizer) or copy.deepcopy(getattr(pipe, limit.tokenizer))

    @property
    def _argument(self) -> str:
        return f" ({self.limit.argument})" if self.limit.argument else ""

    def check(self, name: str, text: str) -> None:
        """Raise ConfigError naming `name` if `text` is not readable text or is over the token limit."""
        _check_unicode(name, text)
        for tokenizer in self._tokenizers.values():
            try:
                _token_count(tokenizer, text)
            except Exception as error:  # noqa: BLE001 - whatever a tokenizer raises, the text is the problem
                raise ConfigError(
                    f"{name} cannot be read by the model's tokenizer ({type(error).__name__}); send plain text",
                    field=name,
                ) from error
        tokens = _token_count(self._counter, text)
        if tokens > self.limit.tokens:
            raise ConfigError(
                f"{name} is {tokens} tokens but this model reads at most {self.limit.tokens}{self._argument}; "
                "shorten it (it is refused, not truncated)",
                field=name, value=tokens,
            )


def _check_unicode(name: str, text: str) -> None:
    """Refuse text that is not Unicode scalar values (a lone UTF-16 surrogate, as JSON's \\ud800 allows)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(
            f"{name} is not valid Unicode text: it has a lone surrogate (U+{ord(text[error.start]):04X}) at "
            f"character {error.start}",
            field=name,
        ) from None


def _token_count(tokenizer: Any, text: str) -> int:
    """Tokens `tokenizer` makes of `text`, special tokens included, without truncating."""
    if hasattr(tokenizer, "count_tokens"):
        return int(tokenizer.count_tokens(text))
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
