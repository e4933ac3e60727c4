"""A reward-service client, and ``arbiter score`` (JSON lines in, JSON lines out)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
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
    ) -> reward_pb2.ScoreResponse:
        """``truncation``: a Truncation or its name ("reject", "left", "right")."""
        request = reward_pb2.ScoreRequest(
            inputs=[reward_input_to_pb(item) for item in inputs],
            options=reward_pb2.ScoreOptions(
                model_version=model_version, normalize=normalize, truncation=truncation_to_pb(Truncation(truncation))
            ),
        )
        return self.reward.Score(request, timeout=self.timeout_s, metadata=self.metadata)

    def compare(self, prompt: str, response_a: str, response_b: str, **options) -> reward_pb2.CompareResponse:
        request = reward_pb2.CompareRequest(
            prompt=prompt, response_a=response_a, response_b=response_b, options=reward_pb2.ScoreOptions(**options)
        )
        return self.reward.Compare(request, timeout=self.timeout_s, metadata=self.metadata)

    def drift(self, model_version: str = "") -> reward_pb2.GetScoreDriftResponse:
        request = reward_pb2.GetScoreDriftRequest(model_version=model_version)
        return self.reward.GetScoreDrift(request, timeout=self.timeout_s, metadata=self.metadata)

    def submit_preference(self, request: reward_pb2.SubmitPreferenceRequest) -> reward_pb2.SubmitPreferenceResponse:
        """Record a human preference on the preferences topic (see services/reward/feedback.py)."""
        return self.reward.SubmitPreference(request, timeout=self.timeout_s, metadata=self.metadata)

    def set_shadow(self, model_version: str, sample_fraction: float = 1.0) -> reward_pb2.SetShadowResponse:
        request = reward_pb2.SetShadowRequest(model_version=model_version, sample_fraction=sample_fraction)
        return self.reward.SetShadow(request, timeout=self.timeout_s, metadata=self.admin_metadata)


def _read_batches(lines: TextIO, batch_size: int) -> Iterator[list[RewardInput]]:
    batch: list[RewardInput] = []
    for row in read_stream(lines):
        batch.append(reward_input(row.value, row.where))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_lines(
    client: RewardClient, lines: TextIO, out: TextIO, *, batch_size: int = 32, normalize: bool = False,
    model_version: str = "", truncation: Truncation | str = Truncation.REJECT,
) -> int:
    """Scores JSON lines; returns how many were scored."""
    count = 0
    for batch in _read_batches(lines, batch_size):
        response = client.score(batch, model_version=model_version, normalize=normalize, truncation=truncation)
        for result in response.results:
            row = {"score": result.score, "raw_score": result.raw_score, "model_version": response.model_version}
            if result.id:
                row["id"] = result.id
            if result.truncated:
                row["truncated"] = True
            out.write(json.dumps(row) + "\n")
            count += 1
        out.flush()
    return count


def score_main(args) -> int:
    from services.common.settings import auth_token_from_env

    token = auth_token_from_env()
    try:
        with RewardClient(args.target, timeout_s=args.timeout, token=token, tls_ca_file=args.tls_ca_file) as client:
            score_lines(
                client, sys.stdin, sys.stdout, batch_size=args.batch_size, normalize=args.normalize,
                model_version=args.model_version, truncation=Truncation(args.truncation),
            )
    except JsonlError as err:
        print(f"arbiter score: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"arbiter score: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0
