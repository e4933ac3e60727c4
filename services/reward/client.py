"""A reward-service client, and ``arbiter score`` (JSON lines in, JSON lines out)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from functools import cached_property
from typing import Any, TextIO

import grpc

from arbiter.jsonl import JsonlError, read_stream
from arbiter.types import ChatMessage, RewardInput, Truncation
from arbiter.v1 import reward_pb2, reward_pb2_grpc
from services.common.client import ModelServiceClient
from services.common.convert import conversation_to_pb, truncation_to_pb


def reward_input(row: dict[str, Any], where: str) -> RewardInput:
    """A JSON object -> RewardInput: {"prompt", "response"} or {"messages": [{"role", "content"}...]},
    with an optional "id"; errors are ``JsonlError`` naming the field."""
    if not isinstance(row, dict):
        raise JsonlError(where, "row", f"must be a JSON object, got {type(row).__name__}")
    item_id = str(row.get("id", ""))
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise JsonlError(where, "messages", "must be a list of {'role': str, 'content': str}")
        return RewardInput(messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages), id=item_id)
    if not isinstance(row.get("response"), str):
        raise JsonlError(where, "response", "must be a string (with an optional 'prompt'), or give 'messages'")
    prompt = row.get("prompt", "")
    if not isinstance(prompt, str):
        raise JsonlError(where, "prompt", "must be a string")
    return RewardInput(prompt=prompt, response=row["response"], id=item_id)


def reward_input_to_pb(item: RewardInput | reward_pb2.RewardInput) -> reward_pb2.RewardInput:
    if isinstance(item, reward_pb2.RewardInput):
        return item
    if item.messages is None:
        return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=item.prompt, response=item.response), id=item.id)
    return reward_pb2.RewardInput(conversation=conversation_to_pb(item.messages), id=item.id)


class RewardClient(ModelServiceClient):
    SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]

    @cached_property
    def reward(self) -> reward_pb2_grpc.RewardServiceStub:
        return reward_pb2_grpc.RewardServiceStub(self.channel)

    def score(
        self,
        inputs: Iterable[RewardInput | reward_pb2.RewardInput],
        *,
        model_version: str = "",
        normalize: bool = False,
        truncation: Truncation | str = Truncation.REJECT,
        reward_spec: reward_pb2.RewardSpec | None = None,
    ) -> reward_pb2.ScoreResponse:
        """``truncation``: a Truncation or its name ("reject", "left", "right");
        ``reward_spec``: score with it instead of the service's configured one."""
        request = reward_pb2.ScoreRequest(
            inputs=[reward_input_to_pb(item) for item in inputs],
            options=reward_pb2.ScoreOptions(
                model_version=model_version, normalize=normalize, truncation=truncation_to_pb(Truncation(truncation)),
                reward_spec=reward_spec,
            ),
        )
        return self.reward.Score(request, timeout=self.timeout_s, metadata=self.metadata)

    def compare(self, prompt: str, response_a: str, response_b: str, **options) -> reward_pb2.CompareResponse:
        request = reward_pb2.CompareRequest(
            prompt=prompt, response_a=response_a, response_b=response_b, options=reward_pb2.ScoreOptions(**options)
        )
        return self.reward.Compare(request, timeout=self.timeout_s, metadata=self.metadata)

    def drift(self, model_version: str = "", component: str = "") -> reward_pb2.GetScoreDriftResponse:
        """A version's drift, or a configured reward spec's component's (or "total")."""
        request = reward_pb2.GetScoreDriftRequest(model_version=model_version, component=component)
        return self.reward.GetScoreDrift(request, timeout=self.timeout_s, metadata=self.metadata)

    def submit_preference(self, request: reward_pb2.SubmitPreferenceRequest) -> reward_pb2.SubmitPreferenceResponse:
        """Record a human preference on the preferences topic (see services/reward/feedback.py)."""
        return self.reward.SubmitPreference(request, timeout=self.timeout_s, metadata=self.metadata)

    def set_shadow(self, model_version: str, sample_fraction: float = 1.0) -> reward_pb2.SetShadowResponse:
        request = reward_pb2.SetShadowRequest(model_version=model_version, sample_fraction=sample_fraction)
        return self.reward.SetShadow(request, timeout=self.timeout_s, metadata=self.admin_metadata)

    def get_shadow(self, model_version: str) -> reward_pb2.GetShadowResponse:
        request = reward_pb2.GetShadowRequest(model_version=model_version)
        return self.reward.GetShadow(request, timeout=self.timeout_s, metadata=self.metadata)


class ScoreLineError(Exception):
    """An input line of ``arbiter score`` that the service refused."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


# The service names an item inputs[i] and its fields as the proto does; a user
# of ``arbiter score`` wrote JSON lines with these keys.
_ITEM_ERROR = re.compile(r"^inputs\[(\d+)\](?:\.(\S+?))?: (.*)$", re.S)
_JSON_FIELDS = (("text.response", "response"), ("text.prompt", "prompt"), ("conversation.messages", "messages"),
                ("conversation", "messages"))
# Request options the service suggests, as ``arbiter score``'s flags.
_FLAG_WORDING = (("options.truncation to TRUNCATION_LEFT (keeps the end) or TRUNCATION_RIGHT",
                  "--truncation left (keeps the end) or --truncation right"),)


def _item_error(err: grpc.RpcError) -> tuple[int, str] | None:
    """(item index, message naming the JSON field) of an INVALID_ARGUMENT about one item."""
    if err.code() is not grpc.StatusCode.INVALID_ARGUMENT:
        return None
    match = _ITEM_ERROR.match(err.details() or "")
    if match is None:
        return None
    index, field, message = int(match.group(1)), match.group(2), match.group(3)
    for option, flag in _FLAG_WORDING:
        message = message.replace(option, flag)
    if field is None:
        return index, message
    for proto, json_key in _JSON_FIELDS:
        if field == proto or field.startswith(proto + "."):
            field = json_key + field[len(proto):]
            break
    return index, f"{field}: {message}"


def _component_row(component: reward_pb2.RewardComponent) -> dict:
    row = {"value": component.value, "weight": component.weight}
    if len(component.member_scores) > 1:  # an ensemble: its spread is the point
        row.update(mean=component.mean, std=component.std,
                   members=dict(zip(component.versions, component.member_scores)))
    return row


class LineScorer:
    """``arbiter score``: JSON lines in, one JSON line of scores out per input
    line, in order, ``batch_size`` lines per request. It stops at the first
    line that cannot be scored (bad JSON, or refused by the service) having
    written the scores of every line before it and none after, so the output
    always answers a prefix of the input; ``JsonlError`` or ``ScoreLineError``
    names that line, and ``scored`` counts what was written."""

    def __init__(
        self, client: RewardClient, out: TextIO, *, batch_size: int = 32, normalize: bool = False,
        model_version: str = "", truncation: Truncation | str = Truncation.REJECT,
    ):
        self.client, self.out = client, out
        self.batch_size = batch_size
        self.options = {"model_version": model_version, "normalize": normalize, "truncation": truncation}
        self.scored = 0

    def run(self, lines: TextIO) -> int:
        batch: list[RewardInput] = []
        wheres: list[str] = []
        try:
            for row in read_stream(lines):
                batch.append(reward_input(row.value, row.where))
                wheres.append(row.where)
                if len(batch) == self.batch_size:
                    self._send(batch, wheres)
                    batch, wheres = [], []
        except JsonlError:
            if batch:
                self._send(batch, wheres)  # the lines before the bad one
            raise
        if batch:
            self._send(batch, wheres)
        return self.scored

    def _send(self, batch: list[RewardInput], wheres: list[str]) -> None:
        # One refused item fails its whole request: the items before it are
        # sent again on their own (and may hold an earlier refusal: lengths
        # are checked after every item's emptiness).
        end, refused, response = len(batch), None, None
        while end and response is None:
            try:
                response = self.client.score(batch[:end], **self.options)
            except grpc.RpcError as err:
                item = _item_error(err)
                if item is None or item[0] >= end:
                    raise
                end, refused = item[0], item
        for result in response.results if response is not None else ():
            row = {"score": result.score, "raw_score": result.raw_score, "model_version": response.model_version}
            if result.id:
                row["id"] = result.id
            if result.truncated:
                row["truncated"] = True
            if result.components:
                row["components"] = {c.name: _component_row(c) for c in result.components}
            self.out.write(json.dumps(row) + "\n")
            self.scored += 1
        self.out.flush()
        if refused is not None:
            raise ScoreLineError(wheres[refused[0]], refused[1])


def score_main(args) -> int:
    """Exit 2: a flag or an input line is wrong (the message names it; every
    line before a bad one is scored); 1: the service failed."""
    from services.common.client import client_tls_from_args, rpc_error_text
    from services.common.settings import auth_token_from_env

    tls = client_tls_from_args(args, "arbiter score")
    token = auth_token_from_env()
    with RewardClient(args.target, timeout_s=args.timeout, token=token, **tls.kwargs()) as client:
        scorer = LineScorer(client, sys.stdout, batch_size=args.batch_size, normalize=args.normalize,
                            model_version=args.model_version, truncation=Truncation(args.truncation))

        def written() -> str:
            return f" ({scorer.scored} score(s) were written first)" if scorer.scored else ""

        try:
            if args.normalize:
                info = client.info(args.model_version)
                if not info.HasField("normalization"):
                    print(f"arbiter score: --normalize: model version {info.version!r} ships no normalization "
                          "statistics (none in its arbiter.json); drop --normalize for raw scores, or choose a "
                          "version that has them with --model-version", file=sys.stderr)
                    return 2
            scorer.run(sys.stdin)
        except (JsonlError, ScoreLineError) as err:
            print(f"arbiter score: {err}; nothing after this line was scored{written()}", file=sys.stderr)
            return 2
        except grpc.RpcError as err:
            print(f"arbiter score: {rpc_error_text(err, tls)}{written()}", file=sys.stderr)
            return 1
    return 0
