"""The run's Prometheus export (rlhf_ray.run.prometheus) with stand-ins for Ray's metric classes: what each step's
metrics set, counters that count each restart and alarm once, calls in flight; the Grafana dashboard against the
names exported. Scraped from a real run through Ray's metrics port: tests/test_e2e_ppo.py."""
from __future__ import annotations

import pytest


class Recorded:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tag_keys, {}

    def key(self, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        return tuple(sorted(tags.items()))

    def set(self, value, tags):
        self.values[self.key(tags)] = value

    def inc(self, value=1.0, tags=None):
        self.values[self.key(tags)] = self.values.get(self.key(tags), 0.0) + value


@pytest.fixture
def export(monkeypatch):
    import ray.util.metrics

    from rlhf_ray.run.prometheus import PrometheusExport

    monkeypatch.setattr(ray.util.metrics, "Gauge", Recorded)
    monkeypatch.setattr(ray.util.metrics, "Counter", Recorded)
    return PrometheusExport("my_run")


def value(metric, **tags):
    return metric.values[tuple(sorted({"run": "my_run", **tags}.items()))]


def test_a_steps_metrics_set_the_gauges_and_counters_count_each_event_once(export):
    step = {"step": 3, "time/step": 2.0, "time/generate": 1.2, "time/learn": 0.5, "time/reward": 0.2,
            "time/weight_sync": 0.1, "weights/bytes": 4e6, "throughput/tokens_per_s": 800.0,
            "recovery/reward_restarts": 1.0, "recovery/learner_restarts": 0.0, "alarm/kl_high": 1.0}
    export.export(step)
    export.export({**{k: v for k, v in step.items() if k != "alarm/kl_high"}, "step": 4})  # the same restart count
    assert value(export.step) == 4 and value(export.step_seconds) == 2.0
    assert value(export.phase, role="generation", phase="generate") == 1.2
    assert value(export.phase, role="learner", phase="learn") == 0.5
    assert value(export.reward_latency) == 0.2 and value(export.sync_bytes) == 4e6
    assert value(export.tokens, what="step") == 800.0
    assert value(export.restarts, role="reward") == 1.0                    # cumulative in metrics, counted once
    assert (("role", "learner"), ("run", "my_run")) not in export.restarts.values
    assert value(export.alarms, rule="kl_high") == 1.0
    export.export({"step": 5, "recovery/reward_restarts": 3.0})
    assert value(export.restarts, role="reward") == 3.0


def test_calls_in_flight_per_role(export):
    for role, change in (("reward", 1), ("generation", 1), ("reward", 1), ("reward", -1)):
        export.in_flight(role, change)
    assert value(export.calls, role="reward") == 1 and value(export.calls, role="generation") == 1


def test_the_grafana_dashboard_reads_only_what_the_run_exports():
    """docs/grafana/rlhf_ray.json's queries name the metrics rlhf_ray.run.prometheus defines (Ray's names: ray_ +
    name, counters + _total), and every metric has a panel."""
    import json
    import re
    from pathlib import Path

    from rlhf_ray.run.prometheus import METRICS

    dashboard = json.loads((Path(__file__).parents[1] / "docs" / "grafana" / "rlhf_ray.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = {f"ray_{n}" + ("_total" if kind == "counter" else "") for n, (kind, _, _) in METRICS.items()}
    used = {m for e in exprs for m in re.findall(r"\bray_rlhf_\w+", e)}
    assert used == exported, (used ^ exported)
