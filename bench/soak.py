"""Soak: the reward, reference and policy services as real processes
(``arbiter serve``, tiny models, scoring and admin tokens) under mixed valid
and hostile traffic for ``seconds`` (default 180), checking the acceptance
figures of the reliability issue:

- **RSS growth** of each server between the end of the warm-up and the end
  of the run (``VmRSS`` from ``/proc/PID/status``), target < 5 %;
- **a 60 MiB request is refused** (RESOURCE_EXHAUSTED) in < 100 ms: sent to
  each service three times before the traffic starts (idle) and every
  ``refusal_every_s`` under load; its time includes moving the bytes over
  loopback;
- **health stays responsive**: a prober per service calls ``Health/Check``
  every 100 ms on its own connection throughout, floods included (p99 and
  worst).

Traffic per service, ``clients`` closed-loop callers drawing from a weighted
mix: valid calls (Score, Compare, ScoreStream; Generate, GenerateStream;
LogProbs, KL; model info, drift) and hostile ones (bodies that do not parse,
empty and invalid fields, NaN sampling values, token ids outside the
vocabulary, items over the byte limit, unknown model versions with fresh
labels each time, no or the wrong token, the scoring token on the control
plane, loads outside the model roots, calls cancelled mid-flight or with an
expired deadline, streams abandoned after the first message). Beside it,
every ``cycle_every_s`` each service loads a sibling copy of its model under
a new version label, (reward) shadows it, and unloads it; and every
``refusal_every_s`` each gets three floods of tiny items (the costliest
messages of their size to parse): just under the 16 MiB request limit (it
must be parsed before its item count can be refused), just over it (gRPC
should refuse it unparsed) and 60 MiB. Every periodic kind runs once during
the warm-up. A parsed flood leaves the allocator holding a few hundred MB
for a while, which is not a leak but would swamp one; so the RSS compared
is taken at the same point of every flood cycle, just before a round (one
``refusal_every_s`` of ordinary traffic after the previous one): start and
end are the medians of the first and last ``RSS_ROUNDS`` such samples of the
measured load. RSS is also sampled every 2 s for the peak.

Statuses are counted per service; INTERNAL, UNKNOWN and UNAVAILABLE are
"unexpected" (a bug, or a server that died). The number of series on each
server's /metrics page is compared too (a label leak grows it).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ServiceProcess, print_table

DEFAULT_SECONDS = 180.0
SCORING_TOKEN = "soak-scoring-token-0123456789"
ADMIN_TOKEN = "soak-admin-token-0123456789ab"
MiB = 1024 * 1024
# Flood sizes: around the default max_request_bytes (16 MiB), and the acceptance's 60 MiB.
FLOODS = {"16 MiB": 16 * MiB - 4096, "17 MiB": 17 * MiB, "60 MiB": 60 * MiB}
BIG = "60 MiB"
RSS_EVERY_S = 2.0
RSS_ROUNDS = 3
TARGET_GROWTH_PCT = 5.0
TARGET_REFUSAL_MS = 100.0
HEALTH_EVERY_S = 0.1
UNEXPECTED = {"INTERNAL", "UNKNOWN", "UNAVAILABLE"}
WORDS = "the a policy reward model good bad answer question kind helpful short long quick brown fox".split()

SERVICES = {
    # name: (gRPC service, model subdirectory, the RPC a big request goes to)
    "reward": ("arbiter.v1.RewardService", "reward", "Score"),
    "reference": ("arbiter.v1.ReferenceService", "policy", "LogProbs"),
    "policy": ("arbiter.v1.PolicyService", "policy", "Generate"),
}
MODEL_SERVICE = "arbiter.v1.ModelService"
HEALTH = "/grpc.health.v1.Health/Check"


@dataclass
class Call:
    """One kind of request: ``kind`` unary / stream_in (request stream) /
    stream_out (response stream); ``bodies`` serialized requests (a stream's
    messages for stream_in); ``cancel_after_s`` cancels the call that long after
    it starts; ``take`` stops reading a response stream after that many messages."""

    method: str
    bodies: list
    kind: str = "unary"
    token: str | None = SCORING_TOKEN
    weight: float = 1.0
    timeout_s: float = 30.0
    cancel_after_s: float | None = None
    take: int | None = None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _series(metrics_port: int | None) -> int | None:
    if metrics_port is None:
        return None
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        return sum(1 for line in page.read().decode().splitlines() if line and not line.startswith("#"))


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


def _floods(message_cls, field_name: str, item) -> dict[str, bytes]:
    """Serialized ``message_cls`` of each FLOODS size whose repeated
    ``field_name`` holds copies of ``item``: the most items, hence the
    costliest parse, a message of that size can carry. Built from bytes (a
    length-delimited field repeated), not from millions of Python objects."""
    number = message_cls.DESCRIPTOR.fields_by_name[field_name].number
    one = item.SerializeToString()
    assert len(one) < 128
    framed = bytes([(number << 3) | 2, len(one)]) + one
    return {label: framed * (size // len(framed)) for label, size in FLOODS.items()}


def reward_calls(rng: random.Random) -> tuple[list[Call], dict[str, bytes]]:
    from arbiter.v1 import reward_pb2

    def item(prompt: str, response: str) -> reward_pb2.RewardInput:
        return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=prompt, response=response))

    left = reward_pb2.ScoreOptions(truncation=2)

    def score(items, **options) -> bytes:
        return reward_pb2.ScoreRequest(inputs=items, options=reward_pb2.ScoreOptions(**options)).SerializeToString()

    valid = [reward_pb2.ScoreRequest(
        inputs=[item(_text(rng, 6), " " + _text(rng, 8)) for _ in range(rng.randint(1, 4))], options=left,
    ).SerializeToString() for _ in range(16)]
    stream = [reward_pb2.ScoreStreamRequest(correlation_id=str(i), inputs=[item(_text(rng, 4), " " + _text(rng, 6))],
                                            options=left).SerializeToString() for i in range(3)]
    compare = [reward_pb2.CompareRequest(prompt=_text(rng, 5), response_a=" " + _text(rng, 5),
                                         response_b=" " + _text(rng, 5), options=left).SerializeToString()
               for _ in range(4)]
    svc = "/arbiter.v1.RewardService/"
    calls = [
        Call(svc + "Score", valid, weight=6),
        Call(svc + "Compare", compare),
        Call(svc + "ScoreStream", [stream], kind="stream_in"),
        Call(svc + "GetScoreDrift", [reward_pb2.GetScoreDriftRequest().SerializeToString()], weight=0.3),
        # Hostile.
        Call(svc + "Score", [score([item("Q", "")])]),
        Call(svc + "Score", [score([item("Q", " " + _text(rng, 400))], truncation=1)]),  # over 256 tokens, reject
        Call(svc + "Score", [score([item("Q", "x" * 9000)])]),  # over the per-item bytes (32 x 256)
        Call(svc + "Score", [score([item("Q", " ok")], model_version=f"attacker-{i}") for i in range(10_000)]),
        Call(svc + "ScoreStream", [[reward_pb2.ScoreStreamRequest(correlation_id="x", inputs=[item("Q", "")])
                                    .SerializeToString(), b"\xff\xff\xff"]], kind="stream_in"),
        Call(svc + "SetShadow", [reward_pb2.SetShadowRequest(model_version="nope", sample_fraction=0.5)
                                 .SerializeToString()], token=ADMIN_TOKEN, weight=0.3),
        Call(svc + "SetShadow", [reward_pb2.SetShadowRequest().SerializeToString()], weight=0.3),  # scoring token
        Call(svc + "Score", valid, cancel_after_s=0.002),
        Call(svc + "Score", valid, timeout_s=0.001),
        Call(svc + "ScoreStream", [stream], kind="stream_in", take=1),
    ]
    return calls, _floods(reward_pb2.ScoreRequest, "inputs", item("", "x"))


def reference_calls(rng: random.Random, vocab: int) -> tuple[list[Call], dict[str, bytes]]:
    from arbiter.v1 import reference_pb2

    def seq(prompt: int, completion: int, top: int = vocab) -> reference_pb2.TokenSequence:
        return reference_pb2.TokenSequence(prompt_token_ids=[rng.randrange(2, top) for _ in range(prompt)],
                                           completion_token_ids=[rng.randrange(2, top) for _ in range(completion)])

    logprobs = [reference_pb2.LogProbsRequest(sequences=[seq(8, 8) for _ in range(rng.randint(1, 4))])
                .SerializeToString() for _ in range(16)]
    kl = []
    for _ in range(8):
        s = seq(8, 8)
        kl.append(reference_pb2.KLRequest(inputs=[reference_pb2.KLInput(
            sequence=s, policy_logprobs=[-rng.uniform(0.5, 8) for _ in s.completion_token_ids])], estimator=3)
            .SerializeToString())
    svc = "/arbiter.v1.ReferenceService/"
    bad_kl = reference_pb2.KLRequest(inputs=[reference_pb2.KLInput(sequence=seq(4, 4), policy_logprobs=[
        float("nan"), -1e30, 5.0, -800.0])]).SerializeToString()
    calls = [
        Call(svc + "LogProbs", logprobs, weight=4),
        Call(svc + "KL", kl, weight=2),
        # Hostile.
        Call(svc + "LogProbs", [reference_pb2.LogProbsRequest(sequences=[seq(4, 4, top=vocab * 4) for _ in range(2)])
                                .SerializeToString()]),
        Call(svc + "LogProbs", [reference_pb2.LogProbsRequest(sequences=[reference_pb2.TokenSequence(
            prompt_token_ids=[3], completion_token_ids=[-5])]).SerializeToString()]),
        Call(svc + "LogProbs", [reference_pb2.LogProbsRequest(sequences=[seq(300, 10)]).SerializeToString()]),
        Call(svc + "LogProbs", [reference_pb2.LogProbsRequest(sequences=[seq(4, 4)], model_version=f"attacker-{i}")
                                .SerializeToString() for i in range(10_000)]),
        Call(svc + "KL", [bad_kl]),
        Call(svc + "LogProbs", logprobs, cancel_after_s=0.002),
        Call(svc + "KL", kl, timeout_s=0.001),
    ]
    tiny = reference_pb2.TokenSequence(prompt_token_ids=[3], completion_token_ids=[4])
    return calls, _floods(reference_pb2.LogProbsRequest, "sequences", tiny)


def policy_calls(rng: random.Random) -> tuple[list[Call], dict[str, bytes]]:
    from arbiter.v1 import policy_pb2

    def sampling(**kw) -> policy_pb2.SamplingParams:
        return policy_pb2.SamplingParams(**{"max_new_tokens": 8, "temperature": 1.0, "n": 2, **kw})

    generate = [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text=_text(rng, 6))],
                                           sampling=sampling(seed=i)).SerializeToString() for i in range(16)]
    stream = [policy_pb2.GenerateStreamRequest(prompt=policy_pb2.PromptInput(text=_text(rng, 6)),
                                               sampling=sampling(n=1, seed=i)).SerializeToString() for i in range(8)]

    def bad(**kw) -> bytes:
        return policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text="hi")], sampling=sampling(**kw)
                                          ).SerializeToString()

    svc = "/arbiter.v1.PolicyService/"
    calls = [
        Call(svc + "Generate", generate, weight=4),
        Call(svc + "GenerateStream", stream, kind="stream_out"),
        # Hostile.
        Call(svc + "Generate", [bad(temperature=float("nan")), bad(top_p=7.0), bad(n=10_000), bad(max_new_tokens=-3),
                                bad(stop=["x" * 5000])]),
        Call(svc + "Generate", [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text="")])
                                .SerializeToString()]),
        Call(svc + "Generate", [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text="x" * 9000)])
                                .SerializeToString()]),
        Call(svc + "Generate", [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text="hi")],
                                                           model_version=f"attacker-{i}").SerializeToString()
                                for i in range(10_000)]),
        Call(svc + "GenerateStream", stream, kind="stream_out", take=1),
        Call(svc + "Generate", generate, cancel_after_s=0.01),
        Call(svc + "Generate", generate, timeout_s=0.001),
    ]
    return calls, _floods(policy_pb2.GenerateRequest, "prompts", policy_pb2.PromptInput(text="x"))


def common_calls(service: str) -> list[Call]:
    """What every model server gets: model info, and the hostile rest."""
    from arbiter.v1 import common_pb2

    grpc_service = SERVICES[service][0]
    models = f"/{MODEL_SERVICE}/"
    outside = common_pb2.LoadModelVersionRequest(path="/etc", version="x").SerializeToString()
    return [
        Call(models + "GetModelInfo", [common_pb2.GetModelInfoRequest().SerializeToString()], weight=0.5),
        Call(models + "ListModelVersions", [common_pb2.ListModelVersionsRequest().SerializeToString()], weight=0.3),
        Call(models + "LoadModelVersion", [outside], token=ADMIN_TOKEN, weight=0.3),  # outside the model roots
        Call(models + "LoadModelVersion", [outside], weight=0.3),  # the scoring token on the control plane
        Call(models + "ActivateModelVersion", [common_pb2.ActivateModelVersionRequest(version="nope")
                                              .SerializeToString()], token=ADMIN_TOKEN, weight=0.3),
        Call(f"/{grpc_service}/Nope", [b""]),  # a method that does not exist
        Call(models + "GetModelInfo", [bytes(random.Random(i).randbytes(40)) for i in range(64)]),  # garbage bodies
        Call(models + "GetModelInfo", [b""], token=None),  # no token
        Call(models + "GetModelInfo", [b""], token="wrong-token-0123456789abcdef"),
    ]


@dataclass
class Until:
    """When the load stops (moved later when the warm-up runs long)."""

    at: float

    def running(self) -> bool:
        return time.monotonic() < self.at


@dataclass
class ServiceLoad:
    name: str
    process: ServiceProcess
    calls: list[Call]
    floods: dict[str, bytes]
    sibling: Path
    metrics_port: int | None = None
    statuses: Counter = field(default_factory=Counter)
    health_ms: list[float] = field(default_factory=list)
    # Health latencies (ms) of the checks that overlapped a flood, and of the others.
    health_during_flood_ms: list[float] = field(default_factory=list)
    health_outside_floods_ms: list[float] = field(default_factory=list)
    # {flood label: [ms]}, under load; and the 60 MiB one before the traffic.
    flood_ms: dict[str, list[float]] = field(default_factory=dict)
    idle_refusal_ms: list[float] = field(default_factory=list)
    flood_codes: Counter = field(default_factory=Counter)
    cycles: int = 0
    cycle_errors: list[str] = field(default_factory=list)
    flood_in_flight: bool = False
    rss_kib: list[tuple[float, int]] = field(default_factory=list)
    # (time, KiB) just before each flood round.
    rss_cycle_kib: list[tuple[float, int]] = field(default_factory=list)


def _metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel(target: str, tag: str):
    """A channel on its own connection (``tag``): health probes and big
    uploads must not queue behind each other or the traffic in the client."""
    import grpc

    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 128 * MiB), ("grpc.max_receive_message_length", 128 * MiB),
        ("grpc.use_local_subchannel_pool", 1), ("arbiter.soak.connection", tag)])


async def _invoke(channel, call: Call, body) -> str:
    import grpc

    kw = dict(timeout=call.timeout_s, metadata=_metadata(call.token))
    rpc = None
    try:
        if call.kind == "unary":
            rpc = channel.unary_unary(call.method)(body, **kw)
            if call.cancel_after_s is not None:
                await asyncio.sleep(call.cancel_after_s)
                rpc.cancel()
            await rpc
        else:
            if call.kind == "stream_in":
                rpc = channel.stream_stream(call.method)(iter(body), **kw)
            else:
                rpc = channel.unary_stream(call.method)(body, **kw)
            got = 0
            async for _ in rpc:
                got += 1
                if call.take is not None and got >= call.take:
                    rpc.cancel()
                    break
        return "OK" if call.take is None else "CANCELLED"
    except asyncio.CancelledError:
        # Awaiting a call this client cancelled raises CancelledError too.
        if rpc is not None and rpc.cancelled() and not asyncio.current_task().cancelling():
            return "CANCELLED"
        raise
    except grpc.aio.AioRpcError as err:
        return err.code().name


async def _traffic(load: ServiceLoad, channel, until: Until, seed: int) -> None:
    rng = random.Random(seed)
    weights = [c.weight for c in load.calls]
    while until.running():
        call = rng.choices(load.calls, weights)[0]
        load.statuses[await _invoke(channel, call, rng.choice(call.bodies))] += 1


async def _health(load: ServiceLoad, channel, until: Until) -> None:
    import grpc
    from grpc_health.v1 import health_pb2

    check = channel.unary_unary(HEALTH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
    while until.running():
        overlapped = load.flood_in_flight
        started = time.perf_counter()
        try:
            answer = await check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            ok = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        ms = (time.perf_counter() - started) * 1000
        ms = ms if ok else float("inf")
        load.health_ms.append(ms)
        if overlapped or load.flood_in_flight:
            load.health_during_flood_ms.append(ms)
        else:
            load.health_outside_floods_ms.append(ms)
        await asyncio.sleep(HEALTH_EVERY_S)


async def _flood(load: ServiceLoad, channel, label: str) -> float:
    """One flood to the service's main RPC; its time to an answer (ms)."""
    method = f"/{SERVICES[load.name][0]}/{SERVICES[load.name][2]}"
    load.flood_in_flight = True
    started = time.perf_counter()
    try:
        code = await _invoke(channel, Call(method, [], timeout_s=60), load.floods[label])
    finally:
        load.flood_in_flight = False
    load.flood_codes[f"{label} {code}"] += 1
    load.statuses[code] += 1
    return (time.perf_counter() - started) * 1000


async def _flood_round(load: ServiceLoad, channel) -> None:
    load.rss_cycle_kib.append((time.monotonic(), _rss_kib(load.process.proc.pid)))
    for label in FLOODS:
        load.flood_ms.setdefault(label, []).append(await _flood(load, channel, label))


async def _cycle(load: ServiceLoad, channel, index: int) -> None:
    """Load the sibling copy as a new version, (reward) shadow it, unload it."""
    import grpc

    from arbiter.v1 import common_pb2, common_pb2_grpc, reward_pb2, reward_pb2_grpc

    admin = _metadata(ADMIN_TOKEN)
    version = f"cycle-{index}"
    models = common_pb2_grpc.ModelServiceStub(channel)
    try:
        await models.LoadModelVersion(common_pb2.LoadModelVersionRequest(
            path=str(load.sibling), version=version, activate=False), metadata=admin, timeout=120)
        if load.name == "reward":
            shadow = reward_pb2_grpc.RewardServiceStub(channel).SetShadow
            await shadow(reward_pb2.SetShadowRequest(model_version=version, sample_fraction=0.5), metadata=admin,
                         timeout=30)
            await asyncio.sleep(1.0)  # some traffic is shadow-scored
            await shadow(reward_pb2.SetShadowRequest(), metadata=admin, timeout=30)
        await models.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version=version), metadata=admin,
                                        timeout=120)
        load.cycles += 1
    except grpc.aio.AioRpcError as err:
        load.cycle_errors.append(f"{version}: {err.code().name}: {err.details()}")


async def _periodic(load: ServiceLoad, channel, until: Until, refusal_every_s: float, cycle_every_s: float,
                    warmed: asyncio.Event) -> None:
    """Every kind once at the start (inside the warm-up), then on their schedules."""
    await _flood_round(load, channel)
    await _cycle(load, channel, 0)
    warmed.set()
    next_refusal = time.monotonic() + refusal_every_s
    next_cycle = time.monotonic() + cycle_every_s
    index = 1
    while until.running():
        now = time.monotonic()
        if now >= next_refusal:
            await _flood_round(load, channel)
            next_refusal += refusal_every_s
        elif now >= next_cycle:
            await _cycle(load, channel, index)
            index += 1
            next_cycle += cycle_every_s
        else:
            await asyncio.sleep(max(0.0, min(next_refusal, next_cycle, until.at) - now))


async def _soak(loads: list[ServiceLoad], seconds: float, warmup_s: float, clients: int, refusal_every_s: float,
                cycle_every_s: float) -> tuple[float, float, dict[str, int | None]]:
    """Runs the load: (warm-up end, load end) on time.monotonic(), and each
    service's metric series count at the end of the warm-up."""
    channels = {load.name: [_channel(load.process.target, f"{load.name}-{use}")
                            for use in ("traffic", "health", "periodic")] for load in loads}
    for load in loads:
        for _ in range(3):
            load.idle_refusal_ms.append(await _flood(load, channels[load.name][2], BIG))
    started = time.monotonic()
    warmed_at, until = started + warmup_s, Until(started + warmup_s + seconds)
    tasks, warm_events = [], []
    for i, load in enumerate(loads):
        traffic, probe, periodic = channels[load.name]
        warmed = asyncio.Event()
        warm_events.append(warmed)
        tasks.append(asyncio.create_task(_health(load, probe, until)))
        tasks += [asyncio.create_task(_traffic(load, traffic, until, seed=100 * i + k)) for k in range(clients)]
        tasks.append(asyncio.create_task(_periodic(load, periodic, until, refusal_every_s, cycle_every_s, warmed)))

    async def sample_rss() -> None:
        while until.running():
            for load in loads:
                load.rss_kib.append((time.monotonic(), _rss_kib(load.process.proc.pid)))
            await asyncio.sleep(RSS_EVERY_S)

    tasks.append(asyncio.create_task(sample_rss()))
    await asyncio.gather(*(e.wait() for e in warm_events))
    # The first round of every periodic kind can outlast a short warm-up.
    warmed_at = max(warmed_at, time.monotonic())
    until.at = max(until.at, warmed_at + seconds)
    await asyncio.sleep(warmed_at - time.monotonic())
    series = {load.name: _series(load.metrics_port) for load in loads}
    print(f"soak: warm-up done after {time.monotonic() - started:.0f}s", flush=True)
    await asyncio.gather(*tasks)
    for opened in channels.values():
        for channel in opened:
            await channel.close()
    return warmed_at, time.monotonic(), series


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(seconds: float = DEFAULT_SECONDS, warmup_s: float | None = None, clients: int = 3,
        refusal_every_s: float = 15.0, cycle_every_s: float = 20.0) -> dict:
    from arbiter.tiny import TinyConfig, make_tiny_models

    warmup_s = min(30.0, max(5.0, seconds / 6)) if warmup_s is None else warmup_s
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="arbiter-soak-") as tmp:
        models = make_tiny_models(Path(tmp) / "models")
        siblings = {}
        for kind in ("reward", "policy"):
            siblings[kind] = Path(tmp) / "models" / f"{kind}-sibling"
            shutil.copytree(models[kind], siblings[kind])
        vocab = TinyConfig().vocab_size
        env = {"ARBITER_AUTH_TOKEN": SCORING_TOKEN, "ARBITER_ADMIN_TOKEN": ADMIN_TOKEN}
        processes = {
            name: ServiceProcess([name, "--model", str(models[sub]), "--metrics-port", "0", "--torch-threads", "1"],
                                 env=env, wait=False)
            for name, (_, sub, _) in SERVICES.items()
        }
        try:
            built = {"reward": reward_calls(rng), "reference": reference_calls(rng, vocab), "policy": policy_calls(rng)}
            loads = []
            for name, process in processes.items():
                process.wait_ready()
                calls, floods = built[name]
                loads.append(ServiceLoad(name, process, calls + common_calls(name), floods,
                                         siblings[SERVICES[name][1]], metrics_port=process.metrics_port))
            print(f"soak: {seconds:.0f}s after a {warmup_s:.0f}s warm-up, {clients} clients per service", flush=True)
            warmed_at, ended_at, series = asyncio.run(
                _soak(loads, seconds, warmup_s, clients, refusal_every_s, cycle_every_s))
            end_series = {load.name: _series(load.metrics_port) for load in loads}
            alive = {load.name: load.process.proc.poll() is None for load in loads}
        finally:
            for process in processes.values():
                process.stop()
    return _report(loads, warmed_at, ended_at, series, end_series, alive)


def _rss_start_end(samples: list[tuple[float, int]], after: float) -> tuple[float, float]:
    """Medians (MiB) of the first and last RSS_ROUNDS per-cycle samples taken after ``after``."""
    measured = [kib / 1024 for at, kib in samples if at >= after]
    if not measured:
        return float("nan"), float("nan")
    rounds = min(RSS_ROUNDS, max(1, len(measured) // 3))
    return statistics.median(measured[:rounds]), statistics.median(measured[-rounds:])


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} / {max(values):.0f}"


def _report(loads: list[ServiceLoad], warmed_at: float, ended_at: float, series: dict, end_series: dict,
            alive: dict) -> dict:
    seconds = ended_at - warmed_at
    rows, summary = [], {}
    for load in loads:
        start_mib, end_mib = _rss_start_end(load.rss_cycle_kib, warmed_at)
        growth = (end_mib - start_mib) / start_mib * 100
        measured = [kib for at, kib in load.rss_kib if at >= warmed_at]
        unexpected = sum(n for code, n in load.statuses.items() if code in UNEXPECTED)
        requests = sum(load.statuses.values())
        big = load.flood_ms.get(BIG, [])
        summary[load.name] = {
            "rss_start_mib": start_mib, "rss_end_mib": end_mib,
            "rss_peak_mib": max(measured, default=0) / 1024, "rss_growth_pct": growth,
            "rss_per_cycle_mib": [kib / 1024 for _, kib in load.rss_cycle_kib],
            "refusal_60mib_idle_ms_median": statistics.median(load.idle_refusal_ms),
            "refusal_60mib_ms_median": statistics.median(big) if big else float("nan"),
            "refusal_60mib_ms_max": max(big, default=float("nan")),
            "flood_ms": {label: {"median": statistics.median(v), "max": max(v)} for label, v in load.flood_ms.items()},
            "flood_codes": dict(load.flood_codes),
            "health_p50_ms": _percentile(load.health_ms, 50), "health_p99_ms": _percentile(load.health_ms, 99),
            "health_max_ms": max(load.health_ms, default=float("nan")),
            "health_during_floods_max_ms": max(load.health_during_flood_ms, default=float("nan")),
            "health_outside_floods_p99_ms": _percentile(load.health_outside_floods_ms, 99),
            "health_outside_floods_max_ms": max(load.health_outside_floods_ms, default=float("nan")),
            "health_checks": len(load.health_ms),
            "requests": requests, "requests_per_s": requests / seconds, "unexpected": unexpected,
            "statuses": dict(load.statuses.most_common()),
            "version_cycles": load.cycles, "cycle_errors": load.cycle_errors,
            "metric_series_start": series[load.name], "metric_series_end": end_series[load.name],
            "alive": alive[load.name],
        }
        s = summary[load.name]
        rows.append([
            load.name, f"{start_mib:.0f} -> {end_mib:.0f} ({s['rss_peak_mib']:.0f})", f"{growth:+.2f}",
            f"{s['refusal_60mib_idle_ms_median']:.0f}", _ms(big), _ms(load.flood_ms.get("17 MiB", [])),
            _ms(load.flood_ms.get("16 MiB", [])),
            f"{s['health_p50_ms']:.0f} / {s['health_p99_ms']:.0f} / {s['health_max_ms']:.0f}",
            f"{s['health_outside_floods_p99_ms']:.0f} / {s['health_outside_floods_max_ms']:.0f}",
            f"{s['health_during_floods_max_ms']:.0f}", str(requests), str(load.cycles),
            f"{s['metric_series_start']} -> {s['metric_series_end']}",
            f"{unexpected}" + ("" if s["alive"] else " (DIED)"),
        ])
    print_table(
        f"Soak: {seconds:.0f}s of mixed valid + hostile traffic per service, after the warm-up (targets: RSS growth "
        f"< {TARGET_GROWTH_PCT:g} %, 60 MiB refused in < {TARGET_REFUSAL_MS:g} ms)",
        ["service", "RSS MiB start -> end (peak)", "growth %", "60 MiB before traffic ms", "60 MiB loaded ms med/max",
         "17 MiB ms med/max", "16 MiB ms med/max", "health ms p50/p99/max", "health outside floods ms p99/max",
         "health max in floods ms", "requests", "version cycles", "metric series", "INTERNAL UNKNOWN UNAVAILABLE"],
        rows,
    )
    codes = sorted({c for load in loads for c in load.statuses})
    print_table("Soak: status codes per service (floods included)", ["service", *codes],
                [[load.name, *(str(load.statuses.get(c, 0)) for c in codes)] for load in loads])
    for load in loads:
        print(f"soak: {load.name}: RSS MiB before each flood round: "
              + " ".join(f"{kib / 1024:.0f}" + ("" if at >= warmed_at else "*") for at, kib in load.rss_cycle_kib)
              + " (* warm-up)")
        print(f"soak: {load.name}: floods answered {dict(sorted(load.flood_codes.items()))}")
        for error in load.cycle_errors[:5]:
            print(f"soak: {load.name}: version cycle failed: {error}")
    verdicts = [
        f"{name}: growth {s['rss_growth_pct']:+.2f} % "
        + ("ok" if s["rss_growth_pct"] < TARGET_GROWTH_PCT else "OVER TARGET")
        + f", 60 MiB refused in {s['refusal_60mib_idle_ms_median']:.0f} ms before the traffic "
        + ("ok" if s["refusal_60mib_idle_ms_median"] < TARGET_REFUSAL_MS else "OVER TARGET")
        + f", {s['refusal_60mib_ms_median']:.0f} ms under load"
        for name, s in summary.items()
    ]
    print("soak: " + "; ".join(verdicts), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured load after the warm-up")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before the RSS baseline")
    parser.add_argument("--clients", type=int, default=3, help="closed-loop callers per service")
    parser.add_argument("--refusal-every", type=float, default=15.0, help="seconds between oversize rounds")
    parser.add_argument("--cycle-every", type=float, default=20.0, help="seconds between version load/unload cycles")
    args = parser.parse_args(argv)
    return run(args.seconds, args.warmup, args.clients, args.refusal_every, args.cycle_every)


if __name__ == "__main__":
    main()
