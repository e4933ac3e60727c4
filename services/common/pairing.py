"""Policy/reference pairing: the two must tokenize identically, or the
reference scores token ids that mean different text and the KL is garbage,
silently. Rollout workers check the pair once at startup (and the reference
re-checks the fingerprint on every request, in case either side is swapped)."""

from __future__ import annotations

from arbiter.v1 import common_pb2


class TokenizerMismatch(RuntimeError):
    pass


def check_tokenizer_pair(policy: common_pb2.ModelInfo, reference: common_pb2.ModelInfo) -> str:
    """Returns the shared fingerprint; raises ``TokenizerMismatch`` otherwise."""
    for role, info in (("policy", policy), ("reference", reference)):
        if not info.tokenizer_fingerprint:
            raise TokenizerMismatch(f"the {role} model {info.name!r} reports no tokenizer fingerprint; cannot pair")
    if policy.tokenizer_fingerprint != reference.tokenizer_fingerprint:
        raise TokenizerMismatch(
            f"policy {policy.name!r} (version {policy.version!r}) and reference {reference.name!r} "
            f"(version {reference.version!r}) use different tokenizers: fingerprints "
            f"{policy.tokenizer_fingerprint[:16]}... vs {reference.tokenizer_fingerprint[:16]}...; "
            "KL between them would compare unrelated token ids. Serve a reference with the policy's tokenizer"
        )
    return policy.tokenizer_fingerprint
