"""Spans: what a process was doing when — the timeline's raw material (rlhf_ray.run.timeline).

Every role actor records a span around each of its coarse calls (actors.role.timed: generate, score, learn, load a
weight bucket, …) and the driver around each phase of a step (rlhf_ray.drivers.rollout.phase). A span is
``{"name", "start", "end", "thread", "args"}``, times in seconds of this process's wall clock (``clock``); ``args``
holds counts where they apply (tokens, bytes: ``annotate``). The driver takes each actor's spans at the end of a step
(``take``) and moves them onto its own clock (``ClockOffset``).
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

# A test's stand-in for a node whose clock is off (simulated nodes share one clock): seconds added to this
# process's clock.
OFFSET_ENV = "RLHF_RAY_TEST_CLOCK_OFFSET_S"


def clock() -> float:
    return time.time() + float(os.environ.get(OFFSET_ENV, 0.0))


class SpanRecorder:
    """This process's spans since they were last taken (at most ``limit``: the oldest go first)."""

    def __init__(self, limit: int = 100_000):
        self.spans: list[dict] = []
        self.limit, self.dropped = limit, 0
        self.lock = threading.Lock()  # the driver records from its rollout thread too
        self.local = threading.local()  # the open span's args, for ``annotate``

    @contextmanager
    def span(self, name: str, **args):
        start, outer = clock(), getattr(self.local, "args", None)
        self.local.args = dict(args)
        try:
            yield self.local.args
        finally:
            record = {"name": name, "start": start, "end": clock(), "thread": threading.current_thread().name,
                      "args": self.local.args}
            self.local.args = outer
            with self.lock:
                self.spans.append(record)
                if len(self.spans) > self.limit:
                    self.dropped += len(self.spans) - self.limit
                    del self.spans[:len(self.spans) - self.limit]

    def annotate(self, **args) -> None:
        """Add counts (tokens=…, bytes=…) to the innermost open span of this thread."""
        if getattr(self.local, "args", None) is not None:
            self.local.args.update(args)

    def take(self) -> dict:
        """The spans so far (then forgotten), how many were dropped, this clock's reading now and the process."""
        with self.lock:
            spans, self.spans, dropped, self.dropped = self.spans, [], self.dropped, 0
        return {"spans": spans, "dropped": dropped, "clock": clock(), "pid": os.getpid()}


RECORDER = SpanRecorder()  # this process's
span, annotate = RECORDER.span, RECORDER.annotate


class ClockOffset:
    """Another process's clock against this one's, from the calls that read it (``observe``): offset = its reading −
    the midpoint of the call, good to ± half the call's round trip; the tightest round trip seen so far is kept."""

    def __init__(self):
        self.offset, self.error = 0.0, float("inf")

    def observe(self, sent: float, their_clock: float, received: float) -> None:
        error = (received - sent) / 2
        if error < self.error:
            self.offset, self.error = their_clock - (sent + received) / 2, error

    def to_ours(self, t: float) -> float:
        return t - self.offset
