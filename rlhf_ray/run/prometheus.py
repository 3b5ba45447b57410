"""A run's figures as Prometheus metrics through Ray (``ray.util.metrics``, logging.prometheus): Ray's metrics agent
on the driver's node serves them with Ray's own at its metrics export port (``ray.nodes()[i]["MetricsExportPort"]``,
refreshed every few seconds), where a Prometheus that scrapes the cluster finds them (Ray's service discovery file,
or ``ray metrics launch-prometheus``). Ray prefixes the names with ``ray_``; every series carries ``run`` (the output
dir's name) and, where it applies, ``role`` and ``phase``:

    ray_rlhf_step                          the last finished step
    ray_rlhf_step_seconds                  its wall time
    ray_rlhf_phase_seconds{role,phase}     each role's seconds in the last step (time/* of metrics.jsonl)
    ray_rlhf_tokens_per_second{what}       generated tokens per second of the step ('step') and of generation alone
    ray_rlhf_reward_latency_seconds        the reward role's scoring of the last rollout
    ray_rlhf_weight_sync_seconds           publishing and loading the last weights
    ray_rlhf_weight_sync_bytes             what the engines received (the policy or its adapters, in their dtype)
    ray_rlhf_calls_in_flight{role}         the driver's calls on a role not answered yet
    ray_rlhf_restarts_total{role}          actors replaced (a counter)
    ray_rlhf_alarms_total{rule}            alarms fired (rlhf_ray.run.alarms)

The Grafana panel for them: docs/metrics.md.
"""
from __future__ import annotations

import threading

# metrics.jsonl key -> (role, phase) of ray_rlhf_phase_seconds
PHASES = {"time/generate": ("generation", "generate"), "time/reward": ("reward", "score"),
          "time/reference": ("reference", "score"), "time/values": ("learner", "values"),
          "time/learn": ("learner", "learn"), "time/weight_publish": ("learner", "weight_publish"),
          "time/weight_load": ("generation", "weight_load"), "time/rollout_wait": ("driver", "rollout_wait"),
          "time/overhead": ("driver", "overhead")}


# name -> (kind, description, tag keys besides "run"); Ray exports a counter NAME as ray_NAME_total
METRICS = {
    "rlhf_step": ("gauge", "The last finished step.", ()),
    "rlhf_step_seconds": ("gauge", "The last step's wall time.", ()),
    "rlhf_phase_seconds": ("gauge", "Each role's seconds in the last step.", ("role", "phase")),
    "rlhf_tokens_per_second": ("gauge", "Generated tokens per second: of the step, of generation.", ("what",)),
    "rlhf_reward_latency_seconds": ("gauge", "The reward role's scoring of the last rollout.", ()),
    "rlhf_weight_sync_seconds": ("gauge", "Publishing and loading the last weights.", ()),
    "rlhf_weight_sync_bytes": ("gauge", "What the engines received in the last weight sync.", ()),
    "rlhf_calls_in_flight": ("gauge", "The driver's calls on a role not answered yet.", ("role",)),
    "rlhf_restarts": ("counter", "Actors replaced.", ("role",)),
    "rlhf_alarms": ("counter", "Alarms fired.", ("rule",)),
}


class PrometheusExport:
    """The gauges and counters of one run, set from each step's metrics (``export``) and from the waits on the roles
    (``in_flight``, called by rlhf_ray.runtime.waiting)."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.run = run
        made = {name: (Gauge if kind == "gauge" else Counter)(name, description=what, tag_keys=("run", *keys))
                for name, (kind, what, keys) in METRICS.items()}
        self.step, self.step_seconds = made["rlhf_step"], made["rlhf_step_seconds"]
        self.phase = made["rlhf_phase_seconds"]
        self.tokens, self.reward_latency = made["rlhf_tokens_per_second"], made["rlhf_reward_latency_seconds"]
        self.sync_seconds, self.sync_bytes = made["rlhf_weight_sync_seconds"], made["rlhf_weight_sync_bytes"]
        self.calls = made["rlhf_calls_in_flight"]
        self.restarts, self.alarms = made["rlhf_restarts"], made["rlhf_alarms"]
        self.restarts_seen: dict[str, float] = {}
        self.waits: dict[str, int] = {}
        self.lock = threading.Lock()  # waits come from the driver's thread and its rollout thread

    def tags(self, **more) -> dict:
        return {"run": self.run, **more}

    def export(self, metrics: dict) -> None:
        """A finished step's metrics into the gauges and counters."""
        value = lambda key: metrics.get(key) if isinstance(metrics.get(key), (int, float)) else None  # noqa: E731
        self.step.set(metrics["step"], tags=self.tags())
        for key, gauge, tags in (("time/step", self.step_seconds, {}), ("time/reward", self.reward_latency, {}),
                                 ("time/weight_sync", self.sync_seconds, {}), ("weights/bytes", self.sync_bytes, {}),
                                 ("throughput/tokens_per_s", self.tokens, {"what": "step"}),
                                 ("throughput/generate_tokens_per_s", self.tokens, {"what": "generation"})):
            if value(key) is not None:
                gauge.set(value(key), tags=self.tags(**tags))
        for key, (role, phase) in PHASES.items():
            if value(key) is not None:
                self.phase.set(value(key), tags=self.tags(role=role, phase=phase))
        for key in metrics:
            if key.startswith("recovery/") and key.endswith("_restarts") and value(key) is not None:
                role = key[len("recovery/"):-len("_restarts")]
                new = value(key) - self.restarts_seen.get(role, 0.0)
                if new > 0:
                    self.restarts.inc(new, tags=self.tags(role=role))
                self.restarts_seen[role] = value(key)
            elif key.startswith("alarm/"):
                self.alarms.inc(1.0, tags=self.tags(rule=key[len("alarm/"):]))

    def in_flight(self, role: str, change: int) -> None:
        """A call on ``role`` began (+1) or ended (−1)."""
        with self.lock:
            self.waits[role] = self.waits.get(role, 0) + change
            self.calls.set(self.waits[role], tags=self.tags(role=role))
