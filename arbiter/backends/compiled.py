"""``--compile``: a version's forward pass compiled with ``torch.compile``
(TorchInductor: fused C++ kernels on a CPU, Triton kernels on a GPU) before it
serves.

Why: a small model's eager forward is mostly Python dispatch (HF module
calls, one kernel launch per op); the compiled graph runs the same
arithmetic with that overhead gone and elementwise ops fused. Measured on 2
CPU cores (the bench reward model, one torch thread): 1.4x the forwards/s at
batch 1 x 16 tokens, 1.1-1.25x at batch 8-32 and at 128 tokens (README,
"Compiled forward passes"). Scores and log-probs agree with the eager forward
to float rounding (tests compare them).

What it costs, and how each cost is kept off requests:

- Compiling takes seconds to tens of seconds. It runs at load, on the loading
  thread (or in the model process), over warm-up batches of the kind's
  (``ModelKind.warmup_batches``) that reach every graph the shapes need:
  dynamic batch and length dimensions (``dynamic=True``) specialize the sizes
  0 and 1, so batches of one row and of several, items of one token and of
  several, padded and not, are all run once. A version is served only once
  that is done, so a hot swap never stalls a batch; a version that fails to
  compile fails its load (FAILED_PRECONDITION), the serving one untouched.
- The graphs are keyed on the module's code and the parameters' shapes, not
  on the weights (parameters are graph inputs), so a later version of the
  same architecture (every trainer publish) reuses them: its warm-up takes
  milliseconds. Inductor's on-disk cache makes a restarted service's first
  compile faster too.
- ``torch._dynamo`` keeps at most ``recompile_limit`` graphs per code object
  (HF's ``forward``), shared by every architecture a process serves (an
  ensemble's members); past it, calls silently fall back to eager. The limit
  is raised to ``RECOMPILE_LIMIT`` so that a handful of architectures stays
  compiled; torch's config is per thread (context variables), so it is raised
  on the thread that compiles, the one that needs it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arbiter.backends import ModelKind
from arbiter.errors import ModelLoadError

log = logging.getLogger(__name__)

# Graphs per code object: 4 shape specializations (rows 1 / >1, tokens 1 / >1)
# times the architectures one service may serve at once (ensembles, shadows).
RECOMPILE_LIMIT = 64


def compile_for_serving(kind: ModelKind, model: Any, where: str) -> float:
    """Compile ``model`` (in place: the same object, its ``__call__``
    compiled) and run ``kind``'s warm-up batches through ``kind``'s forward,
    so that every graph serving will need exists. Returns the seconds it
    took. ``ModelLoadError`` (naming ``compile``) when the compiler fails:
    a C++ compiler missing on a CPU, an op inductor cannot lower."""
    import torch
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    started = time.perf_counter()
    model.compile(dynamic=True)
    try:
        for batch in kind.warmup_batches:
            kind.forward_torch(model, batch)
    except Exception as err:
        cause = _root_cause(err)
        lines = str(cause).strip().splitlines()
        raise ModelLoadError(
            f"compile: torch.compile could not compile the {kind.name} model at {where!r} "
            f"({type(cause).__name__}: {lines[0] if lines else 'no message'}); serve it without --compile"
        ) from err
    seconds = time.perf_counter() - started
    log.info("compiled the %s model at %s in %.1fs", kind.name, where, seconds)
    return seconds


def _root_cause(err: BaseException) -> BaseException:
    """The exception a compiler failure wraps (dynamo's BackendCompilerFailed
    says only which backend raised): the innermost cause says what is wrong."""
    for _ in range(16):
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    return err
