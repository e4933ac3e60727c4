"""Arbiter core library: models, batching, versions and RLHF math.

Nothing in this package (outside the generated ``arbiter.v1``) knows about
gRPC or protobuf; the deployables in ``services/`` convert at their boundary.
"""

__version__ = "0.1.0"
