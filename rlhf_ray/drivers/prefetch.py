"""``ppo.async_steps: k`` (k ≥ 1): the rollouts sampled ahead of the learner, a bounded queue of at most k.

    driver thread (learner):   take rollout t → values → learn t (θ_t → θ_t+1) → publish θ_t+1 → take rollout t+1 …
    rollout thread (engines):  … load θ_v → sample and score rollout s → load θ_v+1 → sample and score rollout s+1 …

Rollout s is put in the queue when the learner starts step s − k and is sampled by the weights published then,
θ_{s−k}: the engines load each update once, between two rollouts, and the learner never waits for them. So rollout s is
sampled by exactly θ_v with v = max(s − k, floor) (``sampling_version``), where ``floor`` is the step the queue
(re)started at (0, or the step of the checkpoint a run resumed from: the older weights are gone). That is a function of
the step alone, so a run is the same however the two sides' timing falls, and a resumed run is the uninterrupted one.
The learner at step t waits only for rollout t; the engines wait only for the learner to reach step s − k: at most the
rollouts of steps t+1 … t+k are ahead of it. A rollout is sampled by one version (dynamic sampling's extra rounds too),
so a batch never mixes policies and its staleness is one number, t − v: k in steady state, 0, 1, …, k−1 over the first
k steps after the floor.

A checkpoint after c steps keeps the rollouts of steps c … c+k−1 (``kept_steps``): they are sampled by weights before
θ_c, which a resumed run no longer has; rollout c+k on is sampled by θ_c or later, which it has.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_ray.drivers.rollout import Rollout

log = logging.getLogger(__name__)

ROLLOUT_FILE = "rollout-{step:06d}.pt"  # a checkpoint's prefetched rollouts, one file each
OLD_NEXT_ROLLOUT = "next_rollout.pt"    # the one prefetched rollout of checkpoints written with ppo.async_steps=1 before k


def sampling_version(step: int, async_steps: int, floor: int) -> int:
    """The learner update whose weights sample rollout ``step``: v = max(step − k, floor)."""
    return max(step - async_steps, floor)


def kept_steps(step_count: int, async_steps: int) -> range:
    """The rollouts a checkpoint after ``step_count`` = c steps keeps: c … c+k−1, sampled by weights before θ_c."""
    return range(step_count, step_count + async_steps)


def resumable(rollouts: list[Rollout], step_count: int, async_steps: int) -> list[Rollout]:
    """Of a checkpoint's ``rollouts``, those a run at ``step_count`` with ppo.async_steps=k continues with: the
    unbroken run of steps from ``step_count`` on, at most k of them (a resume may lower k; a gap is sampled again)."""
    by_step = {r.step: r for r in rollouts}
    out = []
    for step in kept_steps(step_count, async_steps):
        if step not in by_step:
            break
        out.append(by_step[step])
    return out


@dataclass
class Ahead:
    """A rollout in the queue: its step, the version sampling it, its result (under way or done)."""
    step: int
    version: int
    future: Future


class RolloutQueue:
    """The rollouts of the steps after the learner's, made in order by one background thread with
    ``sample(step, version, payload, cancel)``: the engines take ``payload`` (the published weights of ``version``)
    first where they hold other weights, then sample; a set ``cancel`` stops it after its current call."""

    def __init__(self, async_steps: int, sample: Callable[[int, int, object, threading.Event], Rollout]):
        self.k, self.sample = async_steps, sample
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self.ahead: deque[Ahead] = deque()
        self.floor: int | None = None  # the step the queue (re)started at; None: set by the next fill
        self.cancel = threading.Event()

    def take(self, step: int) -> tuple[Rollout | None, float]:
        """Rollout ``step`` and the seconds waited for it; (None, 0) when the queue does not hold it (emptied then)."""
        if self.ahead and self.ahead[0].step == step:
            start = time.perf_counter()
            try:
                rollout = self.ahead[0].future.result()
            except Exception:  # its error is the step's
                self.ahead.popleft()
                raise
            # taken off only now: a stop signal during the wait leaves it in the queue, for the checkpoint (kept)
            self.ahead.popleft()
            return rollout, time.perf_counter() - start
        self.drop()
        return None, 0.0

    def fill(self, step: int, num_steps: int, published: tuple[int, object]) -> None:
        """With the learner at ``step``: the rollouts of the steps up to step + k (before ``num_steps``) under way.
        ``published``: the version and payload of the learner's latest published weights (θ_step)."""
        version, payload = published
        if self.floor is None:
            self.floor = version
        last = self.ahead[-1].step if self.ahead else step
        for later in range(last + 1, min(step + self.k, num_steps - 1) + 1):
            wanted = sampling_version(later, self.k, self.floor)
            if wanted != version:  # (the schedule above: only the latest weights are ever wanted when it is put in)
                raise RuntimeError(f"rollout {later} wants the weights of update {wanted}, published is {version}")
            self.ahead.append(Ahead(later, version, self.executor.submit(self.sample, later, version, payload,
                                                                         self.cancel)))

    def kept(self, step_count: int, in_hand: Rollout | None = None) -> list[Rollout]:
        """For a checkpoint after ``step_count`` steps: the rollouts of ``kept_steps``, each waited for, from
        ``in_hand`` (the rollout of a step not yet recorded) or the queue; up to the first that is missing or failed
        (the resumed run samples that one and the rest again, by the checkpoint's weights)."""
        queued = {item.step: item.future for item in self.ahead}
        out = []
        for step in kept_steps(step_count, self.k):
            if in_hand is not None and in_hand.step == step:
                out.append(in_hand)
                continue
            if step not in queued:
                break
            try:
                out.append(queued[step].result())
            except Exception as err:  # its error reaches the step that takes it; the checkpoint goes without
                log.warning("the checkpoint of step %d keeps %d of its %d prefetched rollouts: the one for step %d "
                            "failed (%s), so a run resumed from it samples that one and the rest again by the "
                            "checkpoint's weights", step_count, len(out), self.k, step + 1,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                break
        return out

    def settle(self) -> int | None:
        """Wait for every rollout in the queue to end (an engine broadcast needs the engines between rollouts);
        returns the first step whose rollout failed because an engine was replaced during it
        (rlhf_ray.weights.sync.EnginesBehind), None if none did. Other errors stay for the step that takes it."""
        from rlhf_ray.weights.sync import EnginesBehind

        for item in self.ahead:
            if isinstance(item.future.exception(), EnginesBehind):
                return item.step
        return None

    def resample_from(self, step: int, version: int) -> None:
        """The rollouts from ``step`` on (ended: ``settle``) are forgotten, and sampled again by ``version``, the
        weights every engine holds now: the floor of the later ones. Those before ``step`` are kept."""
        while self.ahead and self.ahead[-1].step >= step:
            self.ahead.pop()
        self.floor = version

    def put_back(self, rollouts: list[Rollout], step_count: int) -> None:
        """A resumed run's queue: the checkpoint's ``rollouts`` that it continues with (``resumable``), done."""
        self.drop()
        self.floor = step_count
        for rollout in resumable(rollouts, step_count, self.k):
            done = Future()
            done.set_result(rollout)
            self.ahead.append(Ahead(rollout.step, rollout.policy_version, done))

    def drop(self, wait: bool = True) -> None:
        """Forget every rollout in the queue (a restore, a recovery, the end of the run): those not started are
        cancelled, the one under way stops after its current call; ``wait`` for that (the engines must be idle before
        they get other weights)."""
        self.cancel.set()
        pending = [item.future for item in self.ahead if not item.future.cancel()]
        self.ahead.clear()
        self.floor = None
        if wait:
            for future in pending:
                future.exception()  # an error there does not matter any more
        self.cancel = threading.Event()

    def shutdown(self) -> None:
        self.drop(wait=False)
        self.executor.shutdown(wait=False)


def save_rollouts(directory: Path, rollouts: list[Rollout]) -> None:
    """A checkpoint's prefetched rollouts, one ``torch.load(weights_only=True)``-able file each."""
    import torch

    for rollout in rollouts:
        torch.save(rollout.state_dict(), directory / ROLLOUT_FILE.format(step=rollout.step))


def load_rollouts(directory: Path) -> list[Rollout]:
    """The prefetched rollouts a checkpoint keeps (also the single ``next_rollout.pt`` of older ones), by step."""
    import torch

    files = sorted(Path(directory).glob(ROLLOUT_FILE.replace("{step:06d}", "*")))
    files += [Path(directory) / OLD_NEXT_ROLLOUT] if (Path(directory) / OLD_NEXT_ROLLOUT).is_file() else []
    rollouts = [Rollout.from_state(torch.load(path, weights_only=True)) for path in files]
    return sorted(rollouts, key=lambda r: r.step)
