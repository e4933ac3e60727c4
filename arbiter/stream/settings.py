"""KafkaSettings: how every Arbiter component reaches the brokers.

Dev, tests and CI point it at a local Tansu broker (``arbiter.stream.broker``);
production at real Kafka, with SASL/TLS passed through unchanged. Validated
when constructed; errors name the field.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from arbiter.config import require, require_choice

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# Username/password mechanisms; Kerberos and OAuth need more than settings.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
COMPRESSION_TYPES = ("gzip", "snappy", "lz4", "zstd")

ENV_PREFIX = "ARBITER_KAFKA_"
_SERVER_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")
_TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9._\-]*$")


@dataclass(frozen=True)
class KafkaSettings:
    # "host:port,host:port" or a sequence; stored as a tuple.
    bootstrap_servers: tuple[str, ...] = ("127.0.0.1:9092",)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    # Client certificate for mutual TLS.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    client_id: str = "arbiter"
    # Prepended to every logical topic name (see ``topic``).
    topic_prefix: str = ""
    # -1: the cluster's default (needs Kafka >= 2.4; Tansu accepts it).
    replication_factor: int = -1
    # Consumer groups. Tansu's join takes ~session_timeout/2: tests use 6000.
    session_timeout_ms: int = 10_000
    # None: session_timeout_ms // 3.
    heartbeat_interval_ms: int | None = None
    # The consumer leaves its group if poll() is not called for this long:
    # must exceed the longest training step between polls.
    max_poll_interval_ms: int = 300_000
    max_poll_records: int = 500
    # How long the broker may hold a fetch that has no new data. Low, because
    # a policy update or a rollout batch waiting on it is pipeline latency.
    fetch_max_wait_ms: int = 100
    # Consumers reject (skip, count, log) a record whose value is larger,
    # before decoding it. Real records are far smaller (a 4k-token rollout is
    # ~50 KiB); at least max_request_size, so what this client's producers
    # write is always readable.
    max_record_bytes: int = 4 * 1024 * 1024
    # Consumers copy each record they reject to "<topic>.dead-letter"
    # (arbiter.stream.topics), creating that topic if needed.
    dead_letter: bool = False
    request_timeout_ms: int = 30_000
    # Producer.
    linger_ms: int = 5
    batch_size: int = 256 * 1024
    compression_type: str | None = None
    max_request_size: int = 1024 * 1024
    # How long send() may block for metadata or buffer space before failing.
    max_block_ms: int = 10_000
    # Upper bound on a record's time from send() to acknowledgement, retries included.
    delivery_timeout_ms: int = 120_000

    def __post_init__(self) -> None:
        given = self.bootstrap_servers
        if isinstance(given, str):
            servers = tuple(s.strip() for s in given.split(",") if s.strip())
        else:
            servers = tuple(given)
        object.__setattr__(self, "bootstrap_servers", servers)
        require(bool(servers), "bootstrap_servers", "at least one host:port is required", given)
        for server in servers:
            match = _SERVER_RE.match(server)
            require(
                match is not None and 1 <= int(match.group(2)) <= 65535,
                "bootstrap_servers", f"{server!r} is not host:port (port 1..65535)", ",".join(servers),
            )
        require_choice(self.security_protocol, "security_protocol", SECURITY_PROTOCOLS)
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        if sasl:
            require(
                self.sasl_mechanism in SASL_MECHANISMS, "sasl_mechanism",
                f"must be one of {', '.join(SASL_MECHANISMS)} (required by security_protocol={self.security_protocol})",
                self.sasl_mechanism,
            )
            for name in ("sasl_username", "sasl_password"):
                require(bool(getattr(self, name)), name, f"required with sasl_mechanism={self.sasl_mechanism}",
                        getattr(self, name))
        else:
            # Set but unused would look like authentication that never happens.
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                require(
                    getattr(self, name) is None, name,
                    f"must be unset: security_protocol={self.security_protocol} does not use SASL",
                    # A password never goes into a message.
                    "***" if name == "sasl_password" else getattr(self, name),
                )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is None:
                continue
            require(tls, name, f"must be unset: security_protocol={self.security_protocol} does not use TLS", value)
            require(Path(value).is_file(), name, "must be an existing file", value)
        require(
            (self.ssl_certfile is None) == (self.ssl_keyfile is None),
            "ssl_certfile", "set ssl_certfile and ssl_keyfile together (mutual TLS) or neither", self.ssl_certfile,
        )
        require(bool(self.client_id), "client_id", "must not be empty", self.client_id)
        require(
            len(self.topic_prefix) <= 100 and _TOPIC_PREFIX_RE.match(self.topic_prefix) is not None,
            "topic_prefix", "may only use letters, digits, '.', '_' and '-' (<= 100)", self.topic_prefix,
        )
        require(
            self.replication_factor == -1 or self.replication_factor >= 1,
            "replication_factor", "must be -1 (cluster default) or >= 1", self.replication_factor,
        )
        require(
            1000 <= self.session_timeout_ms <= 1_800_000,
            "session_timeout_ms", "must be in 1000..1800000", self.session_timeout_ms,
        )
        if self.heartbeat_interval_ms is not None:
            require(
                100 <= self.heartbeat_interval_ms < self.session_timeout_ms, "heartbeat_interval_ms",
                f"must be in 100..{self.session_timeout_ms - 1} (below session_timeout_ms)", self.heartbeat_interval_ms,
            )
        require(self.max_poll_interval_ms >= 1000, "max_poll_interval_ms", "must be >= 1000", self.max_poll_interval_ms)
        require(
            1 <= self.max_poll_records <= 100_000, "max_poll_records", "must be in 1..100000", self.max_poll_records,
        )
        require(
            0 <= self.fetch_max_wait_ms <= 60_000, "fetch_max_wait_ms", "must be in 0..60000", self.fetch_max_wait_ms,
        )
        # The client requires fetch wait (500 ms) < request timeout < idle timeout (9 min).
        require(
            1000 <= self.request_timeout_ms < 540_000,
            "request_timeout_ms", "must be in 1000..539999", self.request_timeout_ms,
        )
        require(0 <= self.linger_ms <= 60_000, "linger_ms", "must be in 0..60000", self.linger_ms)
        require(1024 <= self.batch_size <= 64 * 1024 * 1024, "batch_size", "must be in 1 KiB..64 MiB", self.batch_size)
        if self.compression_type is not None:
            require(
                self.compression_type in COMPRESSION_TYPES, "compression_type",
                f"must be one of {', '.join(COMPRESSION_TYPES)} or unset", self.compression_type,
            )
        require(
            1024 <= self.max_request_size <= 100 * 1024 * 1024,
            "max_request_size", "must be in 1 KiB..100 MiB", self.max_request_size,
        )
        require(
            self.max_request_size <= self.max_record_bytes <= 1024 * 1024 * 1024, "max_record_bytes",
            f"must be in max_request_size ({self.max_request_size})..1 GiB: records this client may produce "
            "must be readable", self.max_record_bytes,
        )
        require(self.max_block_ms >= 0, "max_block_ms", "must be >= 0", self.max_block_ms)
        require(
            self.delivery_timeout_ms >= self.linger_ms + self.request_timeout_ms, "delivery_timeout_ms",
            f"must be >= linger_ms + request_timeout_ms ({self.linger_ms + self.request_timeout_ms})",
            self.delivery_timeout_ms,
        )

    def topic(self, name: str) -> str:
        """The wire name of a logical topic (``arbiter.stream.topics``)."""
        return self.topic_prefix + name

    def logical_topic(self, wire_name: str) -> str:
        if self.topic_prefix and not wire_name.startswith(self.topic_prefix):
            raise ValueError(f"topic {wire_name!r} does not start with topic_prefix {self.topic_prefix!r}")
        return wire_name[len(self.topic_prefix):]

    def with_overrides(self, **changes: Any) -> KafkaSettings:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> KafkaSettings:
        """Fields from ARBITER_KAFKA_<FIELD> (e.g. ARBITER_KAFKA_BOOTSTRAP_SERVERS);
        the password also from ARBITER_KAFKA_SASL_PASSWORD_FILE. Keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse_env(f.name, str(f.type), raw)
        password_file = env.get(ENV_PREFIX + "SASL_PASSWORD_FILE")
        if "sasl_password" not in values and password_file:
            values["sasl_password"] = Path(password_file).read_text().strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_INTEGER_RE = re.compile(r"^\s*[+-]?\d+\s*$")


def _parse_env(name: str, type_text: str, raw: str) -> Any:
    variable = ENV_PREFIX + name.upper()
    if type_text.startswith("bool"):
        require(raw.lower() in _BOOLEANS, name, f"{variable} must be a boolean (true/false, 1/0, yes/no)", raw)
        return _BOOLEANS[raw.lower()]
    if type_text.startswith("int"):
        require(_INTEGER_RE.match(raw) is not None, name, f"{variable} must be an integer", raw)
        return int(raw)
    return raw


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """Connection flags for a command that talks to Kafka. Secrets are never
    flags (they would show in process listings): ARBITER_KAFKA_SASL_PASSWORD(_FILE)."""
    group = parser.add_argument_group("kafka (defaults from ARBITER_KAFKA_* environment variables)")
    group.add_argument("--kafka-bootstrap-servers", help="host:port[,host:port...]")
    group.add_argument("--kafka-security-protocol", choices=SECURITY_PROTOCOLS)
    group.add_argument("--kafka-sasl-mechanism", choices=SASL_MECHANISMS)
    group.add_argument("--kafka-sasl-username")
    group.add_argument("--kafka-ssl-cafile")
    group.add_argument("--kafka-topic-prefix")
    group.add_argument("--kafka-client-id")
    group.add_argument("--kafka-max-record-bytes", type=int,
                       help="consumers skip (count, log) records larger than this (default 4 MiB)")
    group.add_argument("--kafka-dead-letter", action="store_true", default=None,
                       help="copy every record a consumer rejects to <topic>.dead-letter")


def kafka_settings_from_args(args: argparse.Namespace, **overrides: Any) -> KafkaSettings:
    flags = {
        "bootstrap_servers": args.kafka_bootstrap_servers,
        "security_protocol": args.kafka_security_protocol,
        "sasl_mechanism": args.kafka_sasl_mechanism,
        "sasl_username": args.kafka_sasl_username,
        "ssl_cafile": args.kafka_ssl_cafile,
        "topic_prefix": args.kafka_topic_prefix,
        "client_id": args.kafka_client_id,
        "max_record_bytes": args.kafka_max_record_bytes,
        "dead_letter": args.kafka_dead_letter,
    }
    flags.update(overrides)
    return KafkaSettings.from_env(**flags)
