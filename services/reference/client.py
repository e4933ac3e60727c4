"""A reference-service client that refuses to pair with a policy whose
tokenizer differs (see ``services.common.pairing``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from arbiter.v1 import common_pb2, common_pb2_grpc, reference_pb2, reference_pb2_grpc
from services.common.client import call_credentials_metadata, open_channel
from services.common.pairing import check_tokenizer_pair
from services.reference.server import SERVICE_NAMES

_ESTIMATORS = {
    "k1": reference_pb2.KL_ESTIMATOR_K1,
    "k2": reference_pb2.KL_ESTIMATOR_K2,
    "k3": reference_pb2.KL_ESTIMATOR_K3,
}
TokenPair = tuple[Sequence[int], Sequence[int]]


class ReferenceClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 30.0,
        token: str | None = None,
        tls_ca_file: str | None = None,
    ):
        self.channel = open_channel(target, SERVICE_NAMES, timeout_s=timeout_s, tls_ca_file=tls_ca_file)
        self.reference = reference_pb2_grpc.ReferenceServiceStub(self.channel)
        self.models = common_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = call_credentials_metadata(token)
        # Sent with every request once paired: the server re-checks it, so a
        # later swap to a reference with another tokenizer fails loudly too.
        self.tokenizer_fingerprint = ""

    def info(self, model_version: str = "") -> common_pb2.ModelInfo:
        request = common_pb2.GetModelInfoRequest(model_version=model_version)
        return self.models.GetModelInfo(request, timeout=self.timeout_s, metadata=self.metadata).info

    def pair_with(self, policy_info: common_pb2.ModelInfo) -> str:
        """Checks the policy (e.g. ``PolicyClient.info()``) shares this
        reference's tokenizer; raises ``TokenizerMismatch`` if not."""
        self.tokenizer_fingerprint = check_tokenizer_pair(policy_info, self.info())
        return self.tokenizer_fingerprint

    def logprobs(self, sequences: Iterable[TokenPair], *, model_version: str = "") -> reference_pb2.LogProbsResponse:
        request = reference_pb2.LogProbsRequest(
            sequences=[_sequence(p, c) for p, c in sequences],
            model_version=model_version,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )
        return self.reference.LogProbs(request, timeout=self.timeout_s, metadata=self.metadata)

    def kl(
        self,
        items: Iterable[tuple[Sequence[int], Sequence[int], Sequence[float]]],
        *,
        estimator: str = "k1",
        model_version: str = "",
    ) -> reference_pb2.KLResponse:
        """``items``: (prompt ids, completion ids, policy log-probs of the completion)."""
        request = reference_pb2.KLRequest(
            inputs=[
                reference_pb2.KLInput(sequence=_sequence(p, c), policy_logprobs=lps) for p, c, lps in items
            ],
            estimator=_ESTIMATORS[estimator],
            model_version=model_version,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )
        return self.reference.KL(request, timeout=self.timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ReferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sequence(prompt: Sequence[int], completion: Sequence[int]) -> reference_pb2.TokenSequence:
    return reference_pb2.TokenSequence(prompt_token_ids=list(prompt), completion_token_ids=list(completion))
