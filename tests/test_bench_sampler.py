"""The stack sampler behind ``bench/gpu_profile.py`` (``bench.sampled``): a
thread's time goes to the functions on its stack, phase by phase, and a phase
is written out when the phase file moves on."""

from __future__ import annotations

import json
import threading

from helpers import wait_until

from bench.sampled import Sampler


def spin_in_a_marked_function(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def test_a_phase_counts_each_thread_s_stack_and_is_written_when_the_phase_ends(tmp_path):
    phase = tmp_path / "phase"
    phase.write_text("")
    sampler = Sampler(str(tmp_path / "samples"), str(phase))
    stop = threading.Event()
    busy = threading.Thread(target=spin_in_a_marked_function, args=(stop,), name="busy")
    busy.start()
    try:
        threading.Thread(target=sampler.run, name="stack-sampler", daemon=True).start()
        phase.write_text("spinning")
        wait_until(lambda: sampler.phase == "spinning" and sampler.samples["busy"] >= 20,
                   what="20 samples of the busy thread in the phase")
        phase.write_text("")
        written = tmp_path / "samples.spinning.json"
        wait_until(lambda: written.exists() and sampler.phase == "", what="the phase's samples written")
    finally:
        stop.set()
        busy.join()
    report = json.loads(written.read_text())
    thread = report["busy"]
    # Every sample of the thread found it inside the function it runs.
    inclusive = dict(thread["inclusive"])
    [marked] = [where for where in inclusive if where.endswith(":spin_in_a_marked_function")]
    assert inclusive[marked] == thread["samples"] >= 20
    # Before the phase began nothing was counted, and after it was written, nothing is kept.
    assert sampler.phase == "" and not sampler.samples
