"""A reference-service client that refuses to pair with a policy whose
tokenizer differs (see ``services.common.pairing``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

from arbiter.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services.common.client import ModelServiceClient
from services.common.pairing import check_tokenizer_pair

_ESTIMATORS = {
    "k1": reference_pb2.KL_ESTIMATOR_K1,
    "k2": reference_pb2.KL_ESTIMATOR_K2,
    "k3": reference_pb2.KL_ESTIMATOR_K3,
}
# (prompt token ids, completion token ids)
TokenPair = tuple[Sequence[int], Sequence[int]]


class ReferenceClient(ModelServiceClient):
    SERVICE = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"]
    # Sent with every request once paired: the server re-checks it, so a
    # later swap to a reference with another tokenizer fails loudly too.
    tokenizer_fingerprint = ""

    @cached_property
    def reference(self) -> reference_pb2_grpc.ReferenceServiceStub:
        return reference_pb2_grpc.ReferenceServiceStub(self.channel)

    def pair_with(self, policy_info: common_pb2.ModelInfo, reference_info: common_pb2.ModelInfo | None = None) -> str:
        """Checks the policy (e.g. ``PolicyClient.info()``) shares this
        reference's tokenizer; raises ``TokenizerMismatch`` if not.
        ``reference_info``: this reference's info, when the caller has it."""
        self.tokenizer_fingerprint = check_tokenizer_pair(policy_info, reference_info or self.info())
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


def _sequence(prompt: Sequence[int], completion: Sequence[int]) -> reference_pb2.TokenSequence:
    return reference_pb2.TokenSequence(prompt_token_ids=list(prompt), completion_token_ids=list(completion))
