"""ppo.async_steps=k: the queue of rollouts sampled ahead (rlhf_ray.drivers.prefetch), with a fake rollout thread —
which weights sample each batch, how far ahead the engines get, what a checkpoint keeps and what a resume takes back."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.drivers.prefetch import (OLD_NEXT_ROLLOUT, RolloutQueue, kept_steps, load_rollouts, resumable,
                                       sampling_version, save_rollouts)
from rlhf_ray.drivers.rollout import Rollout, RolloutCancelled


def rollout(step: int, version: int, batch=None) -> Rollout:
    return Rollout(step, batch, {"generate": 0.1, "score_wall": 0.1}, {"reward": 0.1}, 0.1, version)


class FakeRun:
    """The driver's side of the queue without Ray: the engines load a published version when told to (recorded), then
    sample; the learner takes rollout t, learns (``learn_s``), publishes θ_t+1."""

    def __init__(self, k: int, sample_s: float = 0.0, learn_s: float = 0.0):
        self.k, self.sample_s, self.learn_s = k, sample_s, learn_s
        self.engine_version, self.learner_step, self.loads, self.ahead = 0, 0, [], []
        self.queue = RolloutQueue(k, self.sample)

    def sample(self, step, version, payload, cancel) -> Rollout:
        if version != self.engine_version:
            assert payload == f"weights {version}"  # the published payload of that very version
            self.loads.append(version)
            self.engine_version = version
        if cancel.is_set():
            raise RolloutCancelled()
        self.ahead.append(step - self.learner_step)  # how far ahead of the learner a rollout starts
        time.sleep(self.sample_s)
        return rollout(step, self.engine_version)

    def run(self, steps: int, start: int = 0, until: int | None = None) -> list[int]:
        """The learner's loop over steps ``start`` … ``until`` of a run of ``steps``; returns each step's staleness
        (its step − the version that sampled its batch)."""
        staleness, self.learner_step = [], start
        published = (start, f"weights {start}" if start else None)
        for t in range(start, steps if until is None else until):
            taken, _ = self.queue.take(t)
            if taken is None:  # inline, by the engines' weights
                taken = rollout(t, self.engine_version)
            self.queue.fill(t, steps, published)
            time.sleep(self.learn_s)
            staleness.append(t - taken.policy_version)
            self.learner_step = t + 1
            published = (t + 1, f"weights {t + 1}")
        return staleness


def test_rollout_s_is_sampled_by_the_weights_k_updates_before_it_from_the_floor_on():
    assert [sampling_version(s, 2, 0) for s in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [sampling_version(s, 2, 10) for s in range(10, 15)] == [10, 10, 10, 11, 12]
    assert list(kept_steps(7, 3)) == [7, 8, 9] and list(kept_steps(7, 1)) == [7]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sample_s, learn_s", [(0.0, 0.01), (0.01, 0.0)])  # learner-bound, then rollout-bound
def test_staleness_reaches_k_and_the_engines_never_run_more_than_k_ahead(k, sample_s, learn_s):
    fake = FakeRun(k, sample_s, learn_s)
    try:
        staleness = fake.run(10)
    finally:
        fake.queue.shutdown()
    # the same however the sides' timing falls: a function of the step alone
    assert staleness == [min(t, k) for t in range(10)]
    assert max(fake.ahead) <= k
    assert fake.loads == list(range(1, 10 - k))  # each update loaded once, in order (the last k are never needed)


def test_a_checkpoint_keeps_the_k_rollouts_sampled_before_its_weights_and_a_resume_continues_exactly():
    fake = FakeRun(2)
    whole = fake.run(8)
    fake.queue.shutdown()

    stopped = FakeRun(2)
    stopped.run(8, until=5)  # 5 steps done; the queue holds the rollouts of steps 5 and 6 (by θ_3 and θ_4)
    kept = stopped.queue.kept(5)
    stopped.queue.shutdown()
    assert [(r.step, r.policy_version) for r in kept] == [(5, 3), (6, 4)]

    resumed = FakeRun(2)
    resumed.engine_version = 5  # the restore loaded the checkpoint's weights
    resumed.queue.put_back(kept, 5)
    try:
        assert resumed.run(8, start=5) == whole[5:]
    finally:
        resumed.queue.shutdown()


def test_a_stop_before_the_step_was_recorded_keeps_its_own_rollout_first():
    queue = RolloutQueue(2, lambda step, version, payload, cancel: rollout(step, version))
    try:
        queue.fill(4, 10, (4, "weights 4"))
        in_hand = rollout(4, 2)
        assert [r.step for r in queue.kept(4, in_hand)] == [4, 5]
    finally:
        queue.shutdown()


def test_a_stop_signal_while_the_learner_waits_for_its_rollout_leaves_the_rollout_for_the_checkpoint():
    release = threading.Event()

    def sample(step, version, payload, cancel):
        release.wait(5)
        return rollout(step, version)

    class Stop(BaseException):  # as rlhf_ray.runtime.signals.RunStopped: raised in the main thread during the wait
        pass

    queue = RolloutQueue(2, sample)
    try:
        queue.fill(0, 10, (0, None))  # 1 and 2
        threading.Timer(0.05, release.set).start()
        future = queue.ahead[0].future
        original = future.result
        future.result = lambda: (_ for _ in ()).throw(Stop())
        with pytest.raises(Stop):
            queue.take(1)
        future.result = original
        assert [r.step for r in queue.kept(1)] == [1, 2]
    finally:
        queue.shutdown()


def test_a_failed_rollout_ends_what_a_checkpoint_keeps_and_its_error_reaches_the_step_that_takes_it():
    def sample(step, version, payload, cancel):
        if step == 2:
            raise RuntimeError("generation lost for good")
        return rollout(step, version)

    queue = RolloutQueue(2, sample)
    try:
        queue.fill(0, 10, (0, None))  # rollouts 1 and 2
        assert [r.step for r in queue.kept(1)] == [1]
        assert queue.take(1)[0].step == 1
        with pytest.raises(RuntimeError, match="lost for good"):
            queue.take(2)
    finally:
        queue.shutdown()


def test_a_resume_takes_the_unbroken_run_of_saved_rollouts_up_to_k():
    saved = [rollout(5, 3), rollout(6, 4), rollout(8, 5)]
    assert [r.step for r in resumable(saved, 5, 2)] == [5, 6]
    assert [r.step for r in resumable(saved, 5, 1)] == [5]          # a resume may lower ppo.async_steps
    assert [r.step for r in resumable(saved, 5, 4)] == [5, 6]       # 7 is missing: 7 and 8 are sampled again
    assert resumable(saved, 6, 2)[0].step == 6 and resumable([rollout(6, 4)], 5, 2) == []


def test_dropping_the_queue_cancels_what_has_not_started_and_waits_for_the_rollout_under_way():
    started, release = threading.Event(), threading.Event()
    made = []

    def sample(step, version, payload, cancel):
        made.append(step)
        started.set()
        release.wait(5)
        if cancel.is_set():
            raise RolloutCancelled()
        return rollout(step, version)

    queue = RolloutQueue(3, sample)
    queue.fill(0, 10, (0, None))  # 1, 2, 3
    assert started.wait(5)
    threading.Timer(0.05, release.set).start()
    queue.drop()
    assert made == [1] and not queue.ahead
    queue.fill(4, 10, (4, "weights 4"))  # a restart: the queue's floor is the step it restarts at
    assert [(a.step, a.version) for a in queue.ahead] == [(5, 4), (6, 4), (7, 4)]
    queue.shutdown()


def test_only_the_latest_published_weights_are_ever_put_in():
    queue = RolloutQueue(2, lambda *args: None)
    try:
        queue.put_back([], 3)
        with pytest.raises(RuntimeError, match="wants the weights of update 3, published is 4"):
            queue.fill(4, 10, (4, "weights 4"))  # (a driver that forgot to tell the queue of its restore)
    finally:
        queue.shutdown()


def test_prefetched_rollouts_round_trip_through_a_checkpoint_and_the_old_single_file_still_loads(tmp_path):
    batch = RolloutBatch.from_samples([[5, 6], [7]], [[8, 9], [10]], [[-1.0, -2.0], [-0.5]], ["stop", "length"],
                                      [[{"role": "user", "content": "q"}]] * 2, ["p", "q"], ["r", "s"], pad_token_id=0)
    batch = batch.with_(scores=torch.tensor([0.5, -1.0]))
    save_rollouts(tmp_path, [rollout(5, 3, batch), rollout(6, 4, batch)])
    old = rollout(5, 4, batch).state_dict()
    del old["load_s"]  # written before the engines' load was recorded
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / OLD_NEXT_ROLLOUT)

    back = load_rollouts(tmp_path)
    assert [(r.step, r.policy_version) for r in back] == [(5, 3), (6, 4)]
    assert torch.equal(back[1].batch.input_ids, batch.input_ids) and torch.equal(back[1].batch.scores, batch.scores)
    old_back, = load_rollouts(tmp_path / "old")
    assert (old_back.step, old_back.policy_version, old_back.load_s) == (5, 4, 0.0)
    assert old_back.batch.response_texts == ["r", "s"]


def test_a_broadcast_settles_the_queue_and_what_a_replaced_engine_sampled_is_sampled_again_by_the_new_weights():
    """weights.transport=collective: before the broadcast every rollout ahead has ended (settle); the first one whose
    engine was replaced (EnginesBehind) and those after it are sampled again by the broadcast weights, the floor."""
    from rlhf_ray.weights.sync import EnginesBehind

    failed = []

    def sample(step, version, payload, cancel):
        time.sleep(0.05)
        if step == 6 and not failed:  # the first try of rollout 6 only
            failed.append(step)
            raise EnginesBehind("an engine replaced during rollout 6")
        return rollout(step, version)

    queue = RolloutQueue(2, sample)
    queue.put_back([rollout(4, 2)], 4)   # the learner at step 4, rollout 4 done (θ_2)
    queue.fill(4, 20, (4, "weights 4"))  # rollouts 5 and 6, by θ_4 (the floor)
    assert [item.step for item in queue.ahead] == [4, 5, 6]
    assert queue.settle() == 6 and all(item.future.done() for item in queue.ahead)
    queue.resample_from(6, 5)            # after the broadcast of θ_5
    assert [item.step for item in queue.ahead] == [4, 5]
    assert queue.take(4)[0].policy_version == 2
    queue.fill(5, 20, (5, "weights 5"))  # rollouts 6 and 7 by θ_5: sampling_version(6, 2, floor 5) = 5
    assert [(item.step, item.version) for item in queue.ahead] == [(5, 4), (6, 5), (7, 5)]
    assert queue.settle() is None
    queue.shutdown()
