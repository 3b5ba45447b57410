"""Waiting on the roles' actors: every remote wait has a timeout from ``timeouts.*`` and fails with a message naming the
role and what it was doing — a dead or stuck actor never hangs the run silently."""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlhf_ray.runtime.signals import STOP_SIGNALS

log = logging.getLogger("rlhf_ray.cluster.roles")  # (its records have always been the roles')
NOTICE_S = 120.0  # a wait longer than this is reported on the console, and again every NOTICE_S


class RoleError(RuntimeError):
    """A role failed, died or timed out; the message names the role and what it was doing."""


class NoRoomError(RoleError):
    """Nodes left the cluster with some of the roles, and the remaining nodes cannot host them."""


class ActorLost(RoleError):
    """An actor of ``role`` died (its process is gone) or did not answer within its timeout (``stuck``)."""

    def __init__(self, message: str, role: str, stuck: bool):
        super().__init__(message)
        self.role, self.stuck = role, stuck


WAIT_SLICE_S = 1.0  # how soon a wait notices a stop signal
# set by a run's driver (``watch``): its hang doctor (rlhf_ray.runtime.stacks.HangDoctor), called once by a wait that
# passes its ``fraction`` of the timeout; and what counts the calls in flight per role (rlhf_ray.run.prometheus)
DOCTOR = None
CALLS = None


def watch(doctor, calls=None) -> None:
    """From now on, waits call ``doctor`` when they pass its fraction of their timeout, and ``calls(role, +1 / -1)``
    as they begin and end (None: neither)."""
    global DOCTOR, CALLS
    DOCTOR, CALLS = doctor, calls


def wait(refs, role: str, doing: str, timeout_s: float, timeout_key: str, logs: str = ""):
    """``ray.get`` with a timeout; failures become a RoleError naming the role, what it was doing and,
    for errors raised in an actor, the actor's full traceback. ``logs``: where the role's output goes.

    Waits in slices of WAIT_SLICE_S (a stop signal is acted on between them, never inside Ray), and a
    long wait says so every NOTICE_S instead of staying silent until the timeout."""
    see = f" (its output: {logs})" if logs else ""
    start = time.monotonic()
    notice = start + NOTICE_S
    doctor, calls = DOCTOR, CALLS
    examine = start + doctor.fraction * timeout_s if doctor is not None else None
    if calls is not None:
        calls(role, +1)
    try:
        with STOP_SIGNALS.waiting_on_ray():
            while True:
                STOP_SIGNALS.raise_pending()
                try:
                    return ray.get(refs, timeout=max(0.0, min(WAIT_SLICE_S, start + timeout_s - time.monotonic())))
                except GetTimeoutError:
                    now = time.monotonic()
                    if now - start >= timeout_s:
                        raise
                    if now >= notice:
                        log.info("still waiting for %s (%s): %.0f s of at most %.0f s (%s)", role, doing, now - start,
                                 timeout_s, timeout_key)
                        notice += NOTICE_S
                    if examine is not None and now >= examine:
                        examine = None
                        doctor(role, doing, now - start, timeout_s, timeout_key)
    except GetTimeoutError:
        raise ActorLost(f"{role} did not finish {doing} within {timeout_s:.0f} s; it may be stuck or too slow "
                        f"for its resources (raise {timeout_key} if it is just slow){see}", role, stuck=True) from None
    except RayActorError as err:
        raise ActorLost(f"{role} actor died while {doing}{see}: {str(err).splitlines()[0]}", role,
                        stuck=False) from None
    except RayTaskError as err:
        cause = err.cause
        raise RoleError(f"{role} failed while {doing}: {type(cause).__name__}: {cause}\n"
                        f"--- traceback in the {role} actor{see} ---\n{str(err).rstrip()}") from None
    finally:
        if calls is not None:
            calls(role, -1)

