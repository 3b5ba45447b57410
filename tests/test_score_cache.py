"""The score cache without Ray: canonical keys, identities per backend kind, exact raw scores back, hits counted, the
SQLite store shared by two processes' worth of stores, and components cached one by one."""
from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.backends import build_backend
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.cache import (CachedBackend, DiskStore, MemoryStore, cache_key, function_identity,
                                    model_fingerprint)
from rlhf_ray.rewards.http import serve_function

COUNTER = itertools.count()


def fresh(prompt: str, response: str) -> float:
    """A different score every call: only a cache gives the same one twice."""
    return next(COUNTER) + 0.1234567


def sample(response: str, **extra) -> RewardSample:
    return RewardSample.of([{"role": "user", "content": "Say it."}], "<|user|>\nSay it.\n<|assistant|>\n", response,
                           **extra)


def function_config(**keys) -> RewardConfig:
    return RewardConfig(**{"kind": "function", "function": "tests.test_score_cache:fresh", "cache": "disk", **keys})


def test_the_same_sample_gets_the_same_key_and_any_change_another():
    identity = {"kind": "function", "function": "m:f", "kwargs": {"a": 1, "b": [1, 2]}, "code": "c"}
    reordered = {"code": "c", "kwargs": {"b": [1, 2], "a": 1}, "function": "m:f", "kind": "function"}
    base = sample("four", label="4")
    assert cache_key(identity, base) == cache_key(reordered, sample("four", label="4"))
    assert cache_key(identity, base) == cache_key(identity, sample("four", label="4", fields={"task": "math"}))
    assert len({cache_key(identity, base), cache_key(identity, sample("five", label="4")),
                cache_key(identity, sample("four")), cache_key({**identity, "kwargs": {"a": 2, "b": [1, 2]}}, base),
                cache_key({"kind": "http", "url": "u", "version": "1"}, base),
                cache_key({"kind": "http", "url": "u", "version": "2"}, base)}) == 6


def test_a_function_s_identity_is_its_name_kwargs_and_code():
    one = build_backend(function_config(function="rlhf_ray.rewards:char_frequency", function_kwargs={"char": "a"}))
    other = build_backend(function_config(function="rlhf_ray.rewards:char_frequency", function_kwargs={"char": "b"}))
    assert isinstance(one, CachedBackend) and one.identity["kwargs"] == {"char": "a"}
    assert one.identity["code"] == other.identity["code"] != function_identity("m:f", {}, fresh)["code"]
    assert one.identity != other.identity
    assert not isinstance(build_backend(function_config(cache="off")), CachedBackend)


def test_a_hit_returns_the_raw_score_first_computed_and_is_counted(tmp_path):
    store = MemoryStore()
    backend = build_backend(function_config(), store=store)
    first = backend.score([sample("a"), sample("b"), sample("a")])
    assert first[0] == first[2] != first[1]  # a repeat within the call is scored once: a hit
    stats = backend.take_stats().metrics()
    assert (stats["reward/cache_hits"], stats["reward/cache_misses"]) == (1, 2)
    assert stats["reward/cache_hit_rate"] == pytest.approx(1 / 3)
    again = build_backend(function_config(), store=store).score([sample("b"), sample("a"), sample("c")])
    assert again[0] == first[1] and again[1] == first[0] and again[2] > first.max()
    second = backend.score([sample("a"), sample("c")])
    assert second[0] == first[0]
    assert backend.take_stats().metrics()["reward/cache_hit_rate"] == 1.0


def test_the_disk_store_is_shared_and_keeps_float32_scores_exactly(tmp_path):
    path = tmp_path / "cache" / "scores.sqlite"
    run_one = build_backend(function_config(cache_path=str(path)))
    scores = run_one.score([sample(str(i)) for i in range(1200)])  # more keys than one SELECT may bind
    run_two = build_backend(function_config(cache_path=str(path)))  # another run's store on the same file
    assert torch.equal(run_two.score([sample(str(i)) for i in range(1200)]), scores)
    assert run_two.take_stats().totals == {"cache_hits": 1200, "cache_misses": 0}
    DiskStore(str(path)).put_many({cache_key(run_one.identity, sample("0")): -1.0})
    assert run_two.score([sample("0")]).item() == scores[0].item()  # the first score stays
    with pytest.raises(ValueError, match=r"models.reward.cache_path='/proc/nope/x.sqlite': cannot open it"):
        DiskStore("/proc/nope/x.sqlite")


def test_an_http_endpoint_is_cached_by_the_version_it_declares(tmp_path, caplog):
    path = str(tmp_path / "scores.sqlite")
    with serve_function(fresh, version="v1") as versioned, serve_function(fresh) as plain:
        cached = build_backend(RewardConfig(kind="http", url=versioned.url, cache="disk", cache_path=path))
        assert cached.identity == {"kind": "http", "url": versioned.url, "version": "v1"}
        first = cached.score([sample("x")])
        assert torch.equal(cached.score([sample("x")]), first) and versioned.requests == 1
        versioned.version = "v2"  # a new version: scored again
        bumped = build_backend(RewardConfig(kind="http", url=versioned.url, cache="disk", cache_path=path))
        assert not torch.equal(bumped.score([sample("x")]), first)
        with caplog.at_level(logging.WARNING, logger="rlhf_ray.rewards.cache"):
            unversioned = build_backend(RewardConfig(kind="http", url=plain.url, cache="disk", cache_path=path))
        assert not isinstance(unversioned, CachedBackend)
        assert f"http {plain.url} declares no version, so its scores are not cached" in caplog.text


def test_a_model_s_fingerprint_follows_its_files(tmp_path, monkeypatch):
    model = tmp_path / "rm"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    first = model_fingerprint(str(model))
    assert first == model_fingerprint(str(model)) and model_fingerprint(str(tmp_path / "absent")) is None
    (model / "config.json").write_text('{"hidden_size": 16}')
    second = model_fingerprint(str(model))
    assert second != first
    monkeypatch.setattr("rlhf_ray.rewards.cache.SMALL_FILE_BYTES", 32)  # the weights: by size and mtime
    by_stat = model_fingerprint(str(model))
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(str(model)) != by_stat


def test_components_are_cached_one_by_one(tmp_path):
    from tests.test_composite_reward import LENGTH

    store = MemoryStore()
    counted = {"name": "fresh", "kind": "function", "function": "tests.test_score_cache:fresh"}
    first = build_backend(RewardConfig(kind="composite", cache="disk", components=[counted, LENGTH]), store=store)
    scores = first.score([sample("abc"), sample("eee")])
    assert first.take_stats().metrics()["reward/cache_misses"] == 4
    # another composite with one component in common, another weight: that component's raw scores are hits
    other = build_backend(RewardConfig(kind="composite", cache="disk", components=[{**counted, "weight": 2.0}]),
                          store=store)
    torch.testing.assert_close(other.score([sample("abc"), sample("eee")]),
                               2 * (scores - torch.tensor([-0.0, -0.5])))
    stats = other.take_stats().metrics()
    assert stats["reward/fresh/cache_hits"] == 2 and stats["reward/cache_hit_rate"] == 1.0
    uncached = build_backend(RewardConfig(kind="composite", cache="disk", components=[{**counted, "cache": "off"}]),
                             store=store)
    assert not isinstance(uncached.backends[0], CachedBackend)


def test_a_sharded_rm_is_not_cached(tmp_path):
    from rlhf_ray.config import ConfigError
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="models.reward.cache: must be 'off' with resources.reward.sharded"):
        tiny_config(tmp_path, None, "resources.reward.sharded=true", "resources.reward.num_actors=2",
                    "models.reward.cache=disk")


def test_a_component_inherits_the_composite_s_cache_through_the_reward_actor(tmp_path):
    from rlhf_ray.actors.reward import RewardActor

    counted = {"name": "fresh", "kind": "function", "function": "tests.test_score_cache:fresh"}
    cfg = RewardConfig(kind="composite", cache="disk", cache_path=str(tmp_path / "c.sqlite"), components=[counted])
    actor = RewardActor(cfg.model_dump(), None)  # as the roles hand it over: every key written out
    assert isinstance(actor.backend.backends[0], CachedBackend)
    assert actor.backend.backends[0].store.path == tmp_path / "c.sqlite"
