"""A conversation rendered with a model's own chat template: the one place a
template's refusal (jinja's ``raise_exception``, e.g. roles that do not
alternate) becomes the caller's error, naming the conversation."""

from __future__ import annotations

from collections.abc import Sequence

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from arbiter.errors import InvalidInput
from arbiter.types import ChatMessage


def render_chat(tokenizer, model_name: str, messages: Sequence[ChatMessage], field: str, **options) -> str:
    """The template's text for ``messages`` (``options``: e.g.
    ``add_generation_prompt``); ``field`` names the conversation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidInput(field, f"model {model_name!r} has no chat template; send plain text instead")
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, **options
        )
    except TemplateSyntaxError:
        raise  # the model's template is broken: the server's problem, not the caller's
    except TemplateError as err:
        raise InvalidInput(field, f"the model's chat template refuses this conversation: {err}") from None
