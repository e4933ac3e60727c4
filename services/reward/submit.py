"""``arbiter rm submit``: send labelled JSON lines to a reward service's
SubmitPreference, one preference per row (pairs or rankings, plain or chat, in
the ``arbiter train rm`` formats), e.g. an annotation tool's export.

Extra keys per row: ``annotator_id`` (else ``--annotator``), ``policy_versions``
and ``id`` (the idempotency key: resubmitting a file trains on each row once).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.common.client import add_client_tls_flags

    parser.add_argument("--target", required=True, help="HOST:PORT of a reward service with Kafka settings")
    parser.add_argument("--file", required=True, help="JSON lines (arbiter train rm formats)")
    parser.add_argument("--annotator", default="", help="annotator id for rows without annotator_id")
    parser.add_argument("--timeout", type=float, default=30.0)
    add_client_tls_flags(parser)


def request_from_row(row: dict, where: str, annotator: str = ""):
    """A training-format row -> SubmitPreferenceRequest; DataError names the field."""
    from arbiter.rm.data import DataError, parse_row
    from arbiter.v1 import reward_pb2
    from services.common.convert import conversation_to_pb

    example = parse_row(row, where)
    request = reward_pb2.SubmitPreferenceRequest()
    first = example.candidates[0]
    if first.messages is None:
        request.prompt = first.prompt
        responses = [c.response for c in example.candidates]
    else:
        prefix = first.messages[:-1]
        for candidate, field in zip(example.candidates, example.fields):
            if candidate.messages[:-1] != prefix:
                raise DataError(where, field, "must continue the same conversation as the other responses with "
                                              "one assistant message")
        request.conversation.CopyFrom(conversation_to_pb(prefix))
        responses = [c.messages[-1].content for c in example.candidates]
    if example.k == 2:
        request.chosen, request.rejected = responses
    else:
        request.ranked_responses.extend(responses)
    annotator_id = row.get("annotator_id", annotator)
    if not isinstance(annotator_id, str):
        raise DataError(where, "annotator_id", "must be a string")
    request.annotator_id = annotator_id
    versions = row.get("policy_versions", [])
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise DataError(where, "policy_versions", "must be a list of version names")
    request.policy_versions.extend(versions)
    request.preference_id = example.id
    return request


def main(args) -> int:
    import grpc

    from arbiter.jsonl import JsonlError, read_jsonl
    from arbiter.rm.data import DataError
    from services.common.client import client_tls_from_args, rpc_error_text
    from services.common.settings import auth_token_from_env
    from services.reward.client import RewardClient

    tls = client_tls_from_args(args, "arbiter rm submit")
    try:
        # Every row is checked before the first is sent: a bad file sends nothing.
        requests = [
            (row.where, request_from_row(row.value, row.where, args.annotator)) for row in read_jsonl(args.file)
        ]
    except (JsonlError, DataError) as err:
        print(f"arbiter rm submit: {err}", file=sys.stderr)
        return 2
    with RewardClient(args.target, timeout_s=args.timeout, token=auth_token_from_env(), **tls.kwargs()) as client:
        for where, request in requests:
            try:
                answer = client.submit_preference(request)
            except grpc.RpcError as err:
                print(f"arbiter rm submit: {where}: {rpc_error_text(err, tls)}", file=sys.stderr)
                return 1
            print(json.dumps({"line": where, "preference_id": answer.preference_id, "topic": answer.topic,
                              "partition": answer.partition, "offset": answer.offset}), flush=True)
    return 0
