"""A reward-service client, and ``arbiter score`` (JSON lines in, JSON lines out)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import grpc

from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.common.client import call_credentials_metadata, open_channel
from services.reward.server import SERVICE_NAMES

_TRUNCATION = {
    "reject": common_pb2.TRUNCATION_REJECT,
    "left": common_pb2.TRUNCATION_LEFT,
    "right": common_pb2.TRUNCATION_RIGHT,
}


class InputLineError(ValueError):
    pass


def reward_input(row: dict[str, Any], where: str) -> reward_pb2.RewardInput:
    """A JSON object -> RewardInput: {"prompt", "response"} or {"messages": [{"role", "content"}...]}."""
    if not isinstance(row, dict):
        raise InputLineError(f"{where}: expected a JSON object, got {type(row).__name__}")
    item_id = str(row.get("id", ""))
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InputLineError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        conversation = common_pb2.Conversation(
            messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        )
        return reward_pb2.RewardInput(conversation=conversation, id=item_id)
    if not isinstance(row.get("response"), str):
        raise InputLineError(f"{where}: needs a string 'response' (with an optional 'prompt') or 'messages'")
    prompt = row.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputLineError(f"{where}: 'prompt' must be a string")
    return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=row["response"]), id=item_id)


class RewardClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 30.0,
        token: str | None = None,
        tls_ca_file: str | None = None,
    ):
        self.channel = open_channel(target, SERVICE_NAMES, timeout_s=timeout_s, tls_ca_file=tls_ca_file)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.models = common_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = call_credentials_metadata(token)

    def score(
        self,
        inputs: Iterable[reward_pb2.RewardInput],
        *,
        model_version: str = "",
        normalize: bool = False,
        truncation: str = "reject",
    ) -> reward_pb2.ScoreResponse:
        request = reward_pb2.ScoreRequest(
            inputs=list(inputs),
            options=reward_pb2.ScoreOptions(
                model_version=model_version, normalize=normalize, truncation=_TRUNCATION[truncation]
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
        return self.reward.SetShadow(request, timeout=self.timeout_s, metadata=self.metadata)

    def info(self, model_version: str = "") -> common_pb2.ModelInfo:
        request = common_pb2.GetModelInfoRequest(model_version=model_version)
        return self.models.GetModelInfo(request, timeout=self.timeout_s, metadata=self.metadata).info

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_batches(lines: TextIO, batch_size: int) -> Iterator[list[reward_pb2.RewardInput]]:
    batch: list[reward_pb2.RewardInput] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputLineError(f"line {number}: not valid JSON ({err.msg})") from None
        batch.append(reward_input(row, f"line {number}"))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_lines(
    client: RewardClient, lines: TextIO, out: TextIO, *, batch_size: int = 32, normalize: bool = False,
    model_version: str = "", truncation: str = "reject",
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

    try:
        with RewardClient(args.target, timeout_s=args.timeout, token=auth_token_from_env(), tls_ca_file=args.tls_ca_file) as client:
            score_lines(
                client, sys.stdin, sys.stdout, batch_size=args.batch_size, normalize=args.normalize,
                model_version=args.model_version, truncation=args.truncation,
            )
    except InputLineError as err:
        print(f"arbiter score: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"arbiter score: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0
