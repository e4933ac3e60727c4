"""Bounds on the text one request may carry, checked before anything is
rendered or tokenized.

Tokenizing costs about a second of CPU per MiB of text on a small core, and a
request's token limit is only known after tokenizing; so a request's text is
first measured in bytes, which is cheap, and refused over its limit. The
per-item bound follows the model: by default ``BYTES_PER_TOKEN`` bytes for
each token of the version's window, far more than any text that fits the
window needs (English averages about 4 bytes per token), so only text that
could not be served anyway, or only by truncating nearly all of it, is
refused. The per-request bound caps the tokenization one request may ask for.

Both are ``LimitExceeded`` (RESOURCE_EXHAUSTED, like gRPC's own refusal of an
oversized message): configured sizes, not malformed requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from arbiter.config import flag, require
from arbiter.errors import LimitExceeded
from arbiter.types import ChatMessage

MiB = 1024 * 1024
# Bytes of text allowed per token of a model's window when max_item_bytes is
# unset: 8x what English text takes, so no text that fits the window is refused.
BYTES_PER_TOKEN = 32
# Threads an engine tokenizes on: off the event loop (health checks and other
# requests stay responsive) and off the model thread (tokenizing never waits
# behind forward passes). Hugging Face's fast tokenizers release the GIL, so
# two requests tokenize in parallel.
TOKENIZER_THREADS = 2


@dataclass(frozen=True)
class TextLimits:
    """Nested in the reward and policy settings, so each is also its flag."""

    # 0: BYTES_PER_TOKEN x the model version's max tokens.
    max_item_bytes: int = field(default=0, metadata=flag(
        help=f"text bytes of one reward input or policy prompt (0: {BYTES_PER_TOKEN} per token of the model's max)"))
    max_request_bytes: int = field(default=16 * MiB, metadata=flag(help="text bytes of one request, all items"))

    def __post_init__(self) -> None:
        require(self.max_item_bytes >= 0, "max_item_bytes", f"must be >= 0 (0: {BYTES_PER_TOKEN} bytes per token)",
                self.max_item_bytes)
        require(self.max_request_bytes >= 1, "max_request_bytes", "must be >= 1", self.max_request_bytes)

    def require_within(self, max_message_bytes: int) -> None:
        """A server's gRPC message limit must let the largest allowed request through."""
        require(max_message_bytes > self.max_request_bytes, "max_message_bytes",
                f"must be > max_request_bytes ({self.max_request_bytes}), or gRPC refuses requests the text "
                "limits allow", max_message_bytes)

    def item_limit(self, max_tokens: int) -> int:
        return self.max_item_bytes or BYTES_PER_TOKEN * max_tokens

    def budget(self, max_tokens: int) -> TextBudget:
        """A budget for one request to a version with ``max_tokens``."""
        return TextBudget(self, max_tokens)


def utf8_size(text: str, cap: int) -> int:
    """``text``'s UTF-8 size, exact up to ``cap``; above it, any number over
    ``cap``. ASCII text, and text with more characters than ``cap``, are
    measured without encoding a copy."""
    if text.isascii() or len(text) > cap:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def message_texts(messages: Iterable[ChatMessage]) -> list[str]:
    return [part for m in messages for part in (m.role, m.content)]


class TextBudget:
    """Counts one request's text, item by item, refusing the first item over
    the per-item limit or the item that takes the request over its limit."""

    def __init__(self, limits: TextLimits, max_tokens: int):
        self.item_limit = limits.item_limit(max_tokens)
        self.request_limit = limits.max_request_bytes
        self._derived = "" if limits.max_item_bytes else f"; {BYTES_PER_TOKEN} per token of the model's {max_tokens}"
        self.total = 0

    def add(self, field: str, texts: Iterable[str], tokenized: bool = True) -> None:
        """``texts`` of the item named ``field``; ``tokenized=False`` for text
        that only counts towards the request (an id echoed back)."""
        # Sizes are exact up to the cap; beyond it a lower bound (hence "at
        # least"), which is over a limit either way.
        cap = max(self.item_limit, self.request_limit) + 1
        size = sum(utf8_size(text, cap) for text in texts)
        if tokenized and size > self.item_limit:
            raise LimitExceeded(
                f"{field}: is at least {size} bytes of text, over the limit of {self.item_limit} per item "
                f"(max_item_bytes{self._derived}); shorten it"
            )
        self.total += size
        if self.total > self.request_limit:
            raise LimitExceeded(
                f"{field}: brings the request to at least {self.total} bytes of text, over the limit of "
                f"{self.request_limit} per request (max_request_bytes); split the request"
            )
