"""Runs a module (``python -m bench.sampled MODULE ARGS...``, e.g. ``cli serve
reward ...``) under a wall-clock stack sampler: a thread that reads every
other thread's Python stack every ``SAMPLE_INTERVAL_S`` and counts, per
thread, the innermost frame (where the time is spent: a C call such as a
kernel launch or a device sync shows as the Python line that made it) and
every function on the stack (inclusive time). No py-spy on the device
machine, and cProfile sees one thread only.

Phases: the sampler polls the file ``$ARBITER_SAMPLER_PHASE`` (written by the
benchmark driving the process); when its content changes, the counts so far
are written as JSON to ``$ARBITER_SAMPLER_OUT.<old phase>.json`` and reset.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import sys
import threading
import time
from collections import Counter, defaultdict

SAMPLE_INTERVAL_S = 0.002
PHASE_POLL_S = 0.05
# Innermost frames kept per stack key.
STACK_DEPTH = 6


# site-packages/, the standard library's folder, the checkout's root.
_PREFIX = re.compile(r"^.*?(/site-packages/|/lib/python3\.\d+/|/work/main/)")


def _where(frame) -> str:
    code = frame.f_code
    path = code.co_filename
    path = _PREFIX.sub("", path)
    return f"{path}:{code.co_name}"


class Sampler:
    def __init__(self, out: str, phase_file: str):
        self.out = out
        self.phase_file = phase_file
        self.phase = self._read_phase()
        self.reset()

    def reset(self) -> None:
        self.samples: Counter[str] = Counter()
        self.leaf: dict[str, Counter[str]] = defaultdict(Counter)
        self.line: dict[str, Counter[str]] = defaultdict(Counter)
        self.inclusive: dict[str, Counter[str]] = defaultdict(Counter)
        self.stacks: dict[str, Counter[str]] = defaultdict(Counter)

    def _read_phase(self) -> str:
        try:
            with open(self.phase_file) as f:
                return f.read().strip()
        except OSError:
            return ""

    def dump(self) -> None:
        if not self.phase or not self.samples:
            return

        def top(counter: Counter, n: int) -> list:
            return counter.most_common(n)

        report = {thread: {"samples": count, "leaf": top(self.leaf[thread], 25), "line": top(self.line[thread], 25),
                           "inclusive": top(self.inclusive[thread], 40), "stacks": top(self.stacks[thread], 12)}
                  for thread, count in self.samples.items()}
        # Whole or not at all: the benchmark reads it as soon as it exists.
        path = f"{self.out}.{self.phase}.json"
        with open(f"{path}.partial", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(f"{path}.partial", path)

    def run(self) -> None:
        me = threading.get_ident()
        next_poll = 0.0
        while True:
            time.sleep(SAMPLE_INTERVAL_S)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + PHASE_POLL_S
                phase = self._read_phase()
                if phase != self.phase:
                    self.dump()
                    self.reset()
                    self.phase = phase
            if not self.phase:
                continue
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = names.get(ident, str(ident))
                # Pool threads are interchangeable: one entry per pool.
                thread = thread.rsplit("_", 1)[0] if thread.rsplit("_", 1)[-1].isdigit() else thread
                self.samples[thread] += 1
                self.leaf[thread][_where(frame)] += 1
                self.line[thread][f"{_where(frame)}:{frame.f_lineno}"] += 1
                seen, chain, f = set(), [], frame
                while f is not None:
                    where = _where(f)
                    if len(chain) < STACK_DEPTH:
                        chain.append(f"{where}:{f.f_lineno}")
                    if where not in seen:
                        seen.add(where)
                        self.inclusive[thread][where] += 1
                    f = f.f_back
                self.stacks[thread][" < ".join(chain)] += 1


def main() -> None:
    out, phase_file = os.environ.get("ARBITER_SAMPLER_OUT"), os.environ.get("ARBITER_SAMPLER_PHASE")
    module, sys.argv = sys.argv[1], sys.argv[1:]
    if out and phase_file:
        sampler = Sampler(out, phase_file)
        threading.Thread(target=sampler.run, name="stack-sampler", daemon=True).start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
