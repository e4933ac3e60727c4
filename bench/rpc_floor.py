"""The RPC floor of the reward benchmark: ``RewardService.Score`` answered
without any work (no validation, tokenizing, model or metrics) by a bare
``grpc.aio`` server in its own process, with the service's message-size
options and a response of the shape a one-item Score gets. Its items/s at a
client count is the most any Score service can reach there with these
clients on this machine, so the gap between it and the in-process forward is
what the RPC itself costs. ``python -m bench.rpc_floor --port 0`` prints
``... on HOST:PORT`` once serving, like ``arbiter serve`` (``bench.common.ServiceProcess``)."""

from __future__ import annotations

import argparse
import asyncio

import grpc

from arbiter.v1 import reward_pb2, reward_pb2_grpc
from services.reward.settings import RewardSettings

# What the service answers one 16-token item with, give or take the score's digits.
RESPONSE = reward_pb2.ScoreResponse(
    results=[reward_pb2.ScoreResult(score=0.123456789, raw_score=0.123456789, num_tokens=30)],
    model_name="bench-rm", model_version="v1",
)


class NoOpReward(reward_pb2_grpc.RewardServiceServicer):
    async def Score(self, request, context):
        return RESPONSE


async def serve(host: str, port: int) -> None:
    settings = RewardSettings(model_dir="no-op")  # only its message limits are read
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    reward_pb2_grpc.add_RewardServiceServicer_to_server(NoOpReward(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"rpc floor (no-op Score) on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
