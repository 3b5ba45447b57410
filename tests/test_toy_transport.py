"""A new weight transport is one module: ``tests/toy_transport.py`` is named by ``module:Class`` and runs PPO with no
other file changed (the learner, the engines, the driver and the planner ask the class, not its name)."""
from __future__ import annotations

import pytest

TOY = "tests.toy_transport:ToyTransport"


def test_transport_names_are_registered_names_or_importable_transport_classes():
    from rlhf_ray.weights import TRANSPORTS, check_transport_name, transport_class
    from rlhf_ray.weights.transport import Transport
    from tests.toy_transport import ToyTransport

    assert transport_class(TOY) is ToyTransport and check_transport_name(TOY) == TOY
    assert check_transport_name("auto") == "auto"
    assert all(issubclass(transport_class(name), Transport) and transport_class(name).name == name
               for name in TRANSPORTS)
    for bad, said in (("smoke_signals", "use one of"), ("tests.no_such_module:Toy", "cannot import"),
                      ("tests.toy_transport:os", "not a rlhf_ray.weights.Transport")):
        with pytest.raises(ValueError, match=f"weights.transport=.*{said}"):
            check_transport_name(bad)


def test_capabilities_not_names_tell_the_transports_apart():
    from rlhf_ray.weights import transport_class
    from rlhf_ray.weights.sync import BroadcastSync, WeightSync

    collective, adapter, files = (transport_class(n) for n in ("collective", "adapter", "files"))
    assert collective.broadcast and collective.from_device and not collective.replayable
    assert collective.driver(None, "collective").__class__ is BroadcastSync
    assert files.driver(None, "files").__class__ is WeightSync and files.replayable and not files.broadcast
    assert adapter.adapter and adapter.engine_options(12)["max_lora_rank"] == 16 and files.engine_options(12) == {}


@pytest.mark.e2e
def test_a_transport_named_by_module_and_class_runs_a_ppo_step(ray_session, tiny_cache, tmp_path):
    from rlhf_ray.drivers.ppo import PPOTrainer
    from rlhf_ray.planning import plan_experiment
    from tests.conftest import tiny_config
    from tests.test_e2e_ppo import FUNCTION_REWARD, SYNC_ATOL, assert_generators_match_learner, fixed_response

    cfg = tiny_config(tmp_path, tiny_cache, *FUNCTION_REWARD, f"weights.transport={TOY}")  # a plain override
    assert "via tests.toy_transport:ToyTransport" in plan_experiment(cfg).phases["weight_sync"].bound
    trainer = PPOTrainer(cfg)
    try:
        roles = trainer.roles
        assert roles.transport == TOY
        syncs, sync = [], roles.sync_weights
        roles.sync_weights = lambda *args, **kw: syncs.append(sync(*args, **kw)) or syncs[-1]
        prompt, response = fixed_response(trainer)
        before = assert_generators_match_learner(trainer, prompt, response)
        metrics = trainer.step()
        after = assert_generators_match_learner(trainer, prompt, response)  # the engines hold the learner's weights
        assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3, "the update barely moved the policy"
        assert metrics["kl/sampler_vs_learner"] < SYNC_ATOL and metrics["time/weight_sync"] > 0
        assert len(syncs) == 1, "the step synced the weights once, through the toy transport"
        toy = syncs[0]["report"]["toy"]  # what the toy's load returned, from what its publish sent
        assert toy["published"] == syncs[0]["report"]["received"] > 0 and toy["loads"] == 1
        assert toy["publisher"] != toy["loader"], "published in the learner's process, loaded in the engine's"
    finally:
        trainer.shutdown()


# ------------------------------------------------------------------ the driver's side (rlhf_ray.weights.sync), no Ray

class _Method:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args, **kwargs):
        self.actor.calls.append((self.name, args, kwargs))
        return getattr(self.actor, self.name)(*args, **kwargs)


class _Actor:
    """Stands for an actor handle: ``actor.method.remote(...)`` runs ``method`` at once and records the call."""

    def __init__(self):
        self.calls, self.published = [], 0

    def __getattr__(self, name):
        if name.endswith("_weights") or name.endswith("_weight_group") or name == "weight_layout":
            return _Method(self, "_" + name)
        raise AttributeError(name)

    def _publish_weights(self, transport, bucket_mb):
        self.published += 1
        return f"update {self.published} by {transport}", 0.1

    def _load_weights(self, payload, timeout_s, transport):
        return {"received": 1, "loaded": 1, "reprocessed": [], "payload": payload}, 0.2

    def _open_weight_group(self):
        return "host", 1

    def _join_weight_group(self, **kwargs):
        return 0

    def _weight_layout(self, bucket_mb, adapter):
        return "layout"


class _Roles:
    def __init__(self, overlapped: bool):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(weights=SimpleNamespace(bucket_mb=1.0),
                                   resources=SimpleNamespace(generation=SimpleNamespace(tensor_parallel_size=1)))
        self.timeouts = SimpleNamespace(weight_sync_s=5.0)
        self.learners, self.generators, self.overlapped = [_Actor()], [_Actor(), _Actor()], overlapped

    def _wait(self, refs, role, doing, timeout):
        return refs

    def _recoverable(self, role, doing, timeout, submit):
        return submit()


def test_a_replacement_engine_gets_the_kept_update_when_overlapped_and_a_new_one_otherwise():
    from rlhf_ray.weights import transport_class

    for overlapped in (True, False):
        roles = _Roles(overlapped)
        sync = transport_class("files").driver(roles, "files")
        assert sync.sync()["report"]["payload"] == "update 1 by files"
        new = _Actor()
        sync.bring_up_to_date([new])
        loaded = [call for call in new.calls if call[0] == "_load_weights"]
        assert len(loaded) == 1 and all(not g.calls[1:] for g in roles.generators)  # the others are left alone
        # overlapped: the update the others hold, not a new one from a learner that may be mid-update
        assert loaded[0][1][0] == ("update 1 by files" if overlapped else "update 2 by files")
        assert roles.learners[0].published == (1 if overlapped else 2)


def test_overlapped_the_engines_load_a_published_update_later_and_a_replacement_gets_the_one_they_hold():
    """ppo.async_steps=k: the driver publishes after each update, the rollout thread loads between rollouts; the
    learner may be several published updates ahead of the engines (k ≥ 2) when an engine is replaced."""
    from rlhf_ray.weights import transport_class

    roles = _Roles(True)
    sync = transport_class("files").driver(roles, "files")
    first, publish_s = sync.publish()
    assert (first, publish_s) == ("update 1 by files", 0.1) and all(not g.calls for g in roles.generators)
    assert sync.load(first)["report"]["payload"] == "update 1 by files"
    second, _ = sync.publish()  # the learner's next update, not loaded yet: the engines sample by update 1
    new = _Actor()
    sync.bring_up_to_date([new])
    assert [call[1][0] for call in new.calls] == ["update 1 by files"]
    assert sync.load(second)["load"] == 0.2 and roles.learners[0].published == 2



def test_overlapped_a_broadcast_is_the_publish_and_a_replacement_during_a_rollout_is_refused_by_name():
    """ppo.async_steps=k with collective: publishing sends to every engine at once (the driver lets the rollouts
    ahead end first: engines_take_part), the rollout thread's load has nothing left to do, and a replacement engine
    cannot be given the weights the others sample by (EnginesBehind: the driver samples those rollouts again)."""
    from rlhf_ray.weights import transport_class
    from rlhf_ray.weights.sync import EnginesBehind

    roles = _Roles(True)
    roles.cfg.ppo = type("PPO", (), {"async_steps": 2})
    sync = transport_class("collective").driver(roles, "collective")
    assert sync.engines_take_part and not transport_class("files").driver(roles, "files").engines_take_part
    payload, seconds = sync.publish()
    assert payload is None and seconds > 0
    assert all([c[1][0] for c in g.calls if c[0] == "_load_weights"] == ["layout"] for g in roles.generators)
    assert sync.load(payload) == {"load": 0.0, "report": None}
    assert all(sum(c[0] == "_load_weights" for c in g.calls) == 1 for g in roles.generators)  # nothing loaded again
    with pytest.raises(EnginesBehind, match="sampled again by the weights of the next update"):
        sync.bring_up_to_date([roles.generators[1]])


def test_a_broadcast_forms_its_group_once_and_again_after_a_replacement():
    from rlhf_ray.weights import transport_class

    roles = _Roles(False)
    sync = transport_class("collective").driver(roles, "collective")
    opened = lambda: sum(call[0] == "_open_weight_group" for call in roles.learners[0].calls)  # noqa: E731
    sync.sync(), sync.sync()
    assert opened() == 1 and [c[1][0] for c in roles.generators[0].calls if c[0] == "_load_weights"] == ["layout"] * 2
    sync.engines_replaced()
    sync.bring_up_to_date([roles.generators[1]])  # every engine takes part in the broadcast, in a group formed anew
    assert opened() == 2 and sum(c[0] == "_load_weights" for c in roles.generators[0].calls) == 3
