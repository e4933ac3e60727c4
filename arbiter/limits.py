"""Bounds on the size of one request, checked on what was sent before
anything is converted, rendered or tokenized.

Tokenizing costs about a second of CPU per MiB of text on a small core, and
converting a message of millions of tiny items to Python objects costs
seconds and gigabytes; a request's token counts are only known after both.
So the services first measure each item as sent (its serialized size, which
is its text plus a few bytes of framing per field; cheap, in C) and refuse it
over its limit. The per-item bound follows the model: by default
``BYTES_PER_TOKEN`` bytes for each token of the version's window, far more
than any item that fits the window needs (English averages about 4 bytes per
token), so only items that could not be served anyway, or only by truncating
nearly all of them, are refused. The per-request bound caps the work one
request may ask for.

Both are ``LimitExceeded`` (RESOURCE_EXHAUSTED, like gRPC's own refusal of an
oversized message): configured sizes, not malformed requests.

A request has to be parsed before it can be measured, and parsing holds the
GIL: a 16 MiB message of two million tiny items takes about 0.4 s (and a few
hundred MB) on a small core, during which the server's event loop, health
checks included, waits. So the servers also set gRPC's receive limit just
above ``max_request_bytes`` (``receive_limit``): anything bigger is refused by
gRPC before it is parsed; what is left is the cost of the largest request the
limits allow, which ``max_request_bytes`` bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.config import flag, require
from arbiter.errors import LimitExceeded

MiB = 1024 * 1024
# Bytes allowed per token of a model's window when max_item_bytes is unset:
# 8x what English text takes, so no item that fits the window is refused.
BYTES_PER_TOKEN = 32
# How far past max_request_bytes gRPC still delivers a request to the
# handler: far enough that a request just over the limit is refused with the
# message naming max_request_bytes, short enough that parsing it costs little.
REQUEST_SLACK_BYTES = 64 * 1024
# Threads an engine tokenizes on: off the event loop (health checks and other
# requests stay responsive) and off the model thread (tokenizing never waits
# behind forward passes). Hugging Face's fast tokenizers release the GIL, so
# two requests tokenize in parallel.
TOKENIZER_THREADS = 2


@dataclass(frozen=True)
class SizeLimits:
    """Nested in the reward and policy settings, so each is also its flag."""

    # 0: BYTES_PER_TOKEN x the model version's max tokens.
    max_item_bytes: int = field(default=0, metadata=flag(
        help=f"bytes of one reward input or policy prompt as sent (0: {BYTES_PER_TOKEN} per token of the model's max)"))
    max_request_bytes: int = field(default=16 * MiB, metadata=flag(help="bytes of one request as sent"))

    def __post_init__(self) -> None:
        require(self.max_item_bytes >= 0, "max_item_bytes", f"must be >= 0 (0: {BYTES_PER_TOKEN} bytes per token)",
                self.max_item_bytes)
        require(self.max_request_bytes >= 1, "max_request_bytes", "must be >= 1", self.max_request_bytes)

    def require_within(self, max_message_bytes: int) -> None:
        """A server's gRPC message limit must let the largest allowed request through."""
        require(max_message_bytes > self.max_request_bytes, "max_message_bytes",
                f"must be > max_request_bytes ({self.max_request_bytes}), or gRPC refuses requests the size "
                "limits allow", max_message_bytes)

    def receive_limit(self, max_message_bytes: int) -> int:
        """gRPC's receive limit for a server with these limits and ``max_message_bytes``."""
        return min(max_message_bytes, self.max_request_bytes + REQUEST_SLACK_BYTES)

    def budget(self, max_tokens: int) -> SizeBudget:
        """The checks for one request to a version with ``max_tokens``."""
        return SizeBudget(self, max_tokens)


class SizeBudget:
    def __init__(self, limits: SizeLimits, max_tokens: int):
        self.item_limit = limits.max_item_bytes or BYTES_PER_TOKEN * max_tokens
        self.request_limit = limits.max_request_bytes
        self._derived = "" if limits.max_item_bytes else f"; {BYTES_PER_TOKEN} per token of the model's {max_tokens}"

    def request(self, size: int) -> None:
        """``size``: the whole request's."""
        if size > self.request_limit:
            raise LimitExceeded(
                f"the request is {size} bytes, over the limit of {self.request_limit} per request "
                "(max_request_bytes); send less per request"
            )

    def item(self, field: str, size: int) -> None:
        if size > self.item_limit:
            raise LimitExceeded(
                f"{field}: is {size} bytes, over the limit of {self.item_limit} per item "
                f"(max_item_bytes{self._derived}); shorten it"
            )


def utf8_size(text: str, cap: int) -> int:
    """``text``'s UTF-8 size, exact up to ``cap``; above it, any number over
    ``cap``. ASCII text, and text with more characters than ``cap``, are
    measured without encoding a copy."""
    if text.isascii() or len(text) > cap:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
