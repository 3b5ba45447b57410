"""Stopping a run cleanly: SIGTERM (what a scheduler sends before pre-empting) or SIGINT becomes ``RunStopped`` in the
driver's main thread, at a moment where nothing is half done."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("rlhf_ray.cluster.roles")  # (its records have always been the roles')


class RunStopped(BaseException):
    """SIGTERM (what a scheduler sends before pre-empting) or SIGINT reached the driver; like
    KeyboardInterrupt it is not an Exception, so nothing on the way catches it by accident."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignals:
    """SIGTERM/SIGINT stop the run with RunStopped in the main thread.

    Never from inside Ray: a handler that raises while Ray deserialises an object comes out as a
    SystemError (seen with SmolLM2). During ``waiting()`` (every wait on the roles) the signal is only
    noted, and the wait raises RunStopped itself within WAIT_SLICE_S. Inside ``deferred()`` the stop waits
    until the block is done: the learner's update, the weight sync and the step's metrics go together, so a
    stop never leaves a half-counted step behind. Elsewhere the handler raises at once."""

    def __init__(self):
        self.deferring, self.waiting, self.pending = False, 0, None
        self._count = threading.Lock()  # the rollout thread of ppo.async_steps ≥ 1 waits on Ray too

    def install(self) -> None:
        """Ray's core worker replaces the driver's SIGTERM handler with a native one that dumps a stack and
        kills the process, nothing cleaned up: take it back (after ray.init)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not (self.deferring or self.waiting):
            raise RunStopped(name)
        if self.deferring and self.pending is None:
            log.warning("%s during the update: stopping once this step is recorded", name)
        self.pending = self.pending or name

    def raise_pending(self) -> None:
        """Raise the noted stop now, unless an update is under way (then ``deferred`` raises it at its end) or this
        is not the main thread (the driver's loop must see it; another thread's waits just go on)."""
        if self.pending and not self.deferring and threading.current_thread() is threading.main_thread():
            name, self.pending = self.pending, None
            raise RunStopped(name)

    @contextmanager
    def waiting_on_ray(self):
        with self._count:
            self.waiting += 1
        try:
            yield
        finally:
            with self._count:
                self.waiting -= 1

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        except BaseException as err:
            # a stop that arrived meanwhile wins: a scheduler signalling the whole process group also
            # kills the actors, and that is no reason to start recovering them
            if self.pending and not isinstance(err, RunStopped):
                raise RunStopped(self.pending) from err
            raise
        finally:
            self.deferring, pending, self.pending = False, self.pending, None
        if pending:
            raise RunStopped(pending)


STOP_SIGNALS = StopSignals()
