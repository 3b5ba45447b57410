"""An HTTP reward endpoint that is down, told on the driver's console while the run rides the outage out.

The HTTP client retries in the reward actor (rlhf_ray.rewards.http), whose output goes to a log file
(``logging.console: quiet``), and the driver meanwhile waits on the actor's scoring call. So the client records the
outage — endpoint, since when, why, until when it waits — in Ray's key-value store (the GCS, which every process of
the cluster reaches, on any node), and a thread in the driver (``OutageWatch``) reads it and says on the console,
when it starts and then once a minute:

    reward endpoint http://…/ unreachable for 60 s (Connection refused); retrying until 300 s (models.reward.outage_s)
    reward endpoint http://…/ reachable again after 75 s

Records are per client process and per Ray job (a run's own), removed when the endpoint answers again.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

NAMESPACE = "rlhf_ray"
NOTICE_S = 60.0   # console notices of an ongoing outage, at most this often per endpoint
POLL_S = 2.0      # how often the driver looks


def _job_prefix(job_id: str) -> str:
    return f"reward_outage/{job_id}/"


class OutageRecord:
    """Publishes one client's outage state under this Ray job (no-op where this process is not connected to Ray)."""

    def __init__(self):
        self.key: str | None = None
        self.state: dict = {}
        self.outages = 0
        try:
            import ray

            if ray.is_initialized():
                self.key = _job_prefix(ray.get_runtime_context().get_job_id()) + uuid.uuid4().hex[:12]
        except Exception:  # no Ray here (the client used on its own): nothing to tell a driver
            self.key = None

    def down(self, url: str, seconds: float, reason: str, limit_s: float) -> None:
        self.state = {"url": url, "seconds": seconds, "reason": reason, "limit_s": limit_s,
                      "outage": f"{self.key}#{self.outages}"}  # tells a new outage from the one before
        self._put(self.state)

    def gave_up(self) -> None:
        """The client stopped waiting (the run stops on its error): kept, so that nobody says 'reachable again'."""
        self._put({**self.state, "gave_up": True})

    def up(self) -> None:
        self.outages += 1
        if self.key:
            self._call(lambda kv: kv._internal_kv_del(self.key, namespace=NAMESPACE))

    def _put(self, state: dict) -> None:
        if self.key:
            self._call(lambda kv: kv._internal_kv_put(self.key, json.dumps(state), overwrite=True,
                                                      namespace=NAMESPACE))

    @staticmethod
    def _call(fn) -> None:
        from ray.experimental import internal_kv

        try:
            fn(internal_kv)
        except Exception as err:  # telling the driver is best effort: the retrying goes on regardless
            log.debug("could not record the reward endpoint's outage: %s", err)


def clear_outages(job_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_job_prefix(job_id), del_by_prefix=True, namespace=NAMESPACE)


def read_outages(job_id: str) -> list[dict]:
    """Every outage recorded under Ray job ``job_id`` now."""
    from ray.experimental import internal_kv

    states = []
    for key in internal_kv._internal_kv_list(_job_prefix(job_id), namespace=NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if value:
            states.append(json.loads(value))
    return states


def notice(state: dict) -> str:
    return (f"reward endpoint {state['url']} unreachable for {state['seconds']:.0f} s ({state['reason']}); retrying "
            f"until {state['limit_s']:.0f} s (models.reward.outage_s)")


class OutageWatch:
    """The driver's side: a thread that reads the outage records every POLL_S and logs a notice when an outage is
    first seen, then every NOTICE_S, and a line when its endpoint answers again. ``read`` and ``clock`` are
    replaceable for tests."""

    def __init__(self, read: Callable[[], list[dict]], clear: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic):
        self.read, self.clear, self.clock = read, clear, clock
        self.told: dict[str, _Told] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_this_job(cls) -> "OutageWatch":
        import ray

        job_id = ray.get_runtime_context().get_job_id()
        return cls(lambda: read_outages(job_id), lambda: clear_outages(job_id))

    def start(self) -> "OutageWatch":
        self._thread = threading.Thread(target=self._run, name="reward-outage-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and remove this job's records (left by a client that gave up)."""
        self._stop.set()
        try:
            self.clear()
        except Exception as err:  # Ray already gone
            log.debug("reward outage records not cleared: %s", err)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as err:  # Ray going down with the run, say: the watch is only a courtesy
                log.debug("reward outage watch: %s", err)

    def poll(self) -> None:
        now, current = self.clock(), {}
        for state in self.read():  # several reward actors: the longest outage of each endpoint
            entry = current.setdefault(state["url"], {"state": state, "ids": set()})
            entry["ids"].add(state.get("outage"))
            if state["seconds"] > entry["state"]["seconds"]:
                entry["state"] = state
        for url, told in list(self.told.items()):
            if url not in current or not current[url]["ids"] & told.ids:  # over (another may have begun since)
                log.info("reward endpoint %s reachable again after about %.0f s", url, told.seconds + now - told.when)
                del self.told[url]
        for url, entry in current.items():
            state, told = entry["state"], self.told.get(url)
            if state.get("gave_up"):  # the run is stopping on its error
                continue
            if told is None or now - told.when >= NOTICE_S:
                log.warning("%s", notice(state))
                self.told[url] = _Told(now, state["seconds"], entry["ids"])
            else:
                told.ids |= entry["ids"]


@dataclass
class _Told:
    """The last notice of an endpoint's outage: when (the watch's clock), its length then, the outages it covers."""
    when: float
    seconds: float
    ids: set
