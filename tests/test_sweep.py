"""The rollout:learn sweep (rlhf_ray.sweep): grid points, figures, outputs (a real point and a refused one end to end:
tests/test_ray_job_submit.py, whose job runs a sweep)."""
from __future__ import annotations

import csv
import json

import pytest

from rlhf_ray.cli import sweep


def test_grid_points_are_every_combination_with_readable_labels():
    points = sweep.points_of({"ppo.async_steps": [0, 1], "resources.generation.num_actors": [1, 2]})
    assert len(points) == 4 and points[-1] == {"ppo.async_steps": 1, "resources.generation.num_actors": 2}
    assert sweep.label_of(points[-1]) == "async=1 engines=2"
    assert sweep.parse_grid(["ppo.epochs=1,2"]) == {"ppo.epochs": [1, 2]}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep.parse_grid(["ppo.epochs"])


def step_row(generate, score, learn, values_wall=None, sync=0.1, tokens=64.0):
    row = {"time/generate": generate, "time/score_wall": score, "time/learn": learn, "time/weight_sync": sync,
           "time/compute_generate": generate, "time/weight_load": sync / 2, "time/reward": score / 2,
           "time/reference": score, "time/values": score / 2, "time/compute_learn": learn,
           "time/weight_publish": sync / 2, "time/rollout_wait": 0.0, "time/overhead": 0.05,
           "response/tokens": tokens, "memory/learner_peak_gb": 1.5, "memory/generation_peak_gb": 2.0}
    if values_wall is None:
        row["time/step"] = generate + score + learn + sync + 0.05
    else:
        row.update({"time/values_wall": values_wall, "time/step": values_wall + learn + sync + 0.05})
    return row


def test_figures_of_a_point_and_the_phase_that_bounds_it():
    rows = [step_row(1.0, 0.5, 2.0), step_row(1.0, 0.5, 2.0)]
    m = sweep.measure(rows, sequences=16, epochs=2)
    assert m["step_s"] == pytest.approx(3.65) and m["samples_per_s"] == pytest.approx(16 / 3.65)
    assert m["trained_tokens_per_s"] == pytest.approx(2 * m["generated_tokens_per_s"])
    assert m["rollout_learn_ratio"] == pytest.approx(1.5 / 2.0) and m["bound_by"] == "learn"
    assert m["idle_share"]["generation"] == pytest.approx(1 - 1.05 / 3.65)
    assert m["peak_gb"] == {"learner": 1.5, "generation": 2.0}
    overlapped = sweep.measure([step_row(2.0, 1.0, 1.0, values_wall=0.5)], sequences=16, epochs=1)
    assert overlapped["bound_by"].startswith("rollout") and overlapped["rollout_learn_ratio"] == pytest.approx(2.0)


def test_labels_and_advice_name_any_overlap_depth():
    assert sweep.label_of({"ppo.async_steps": 2, "resources.generation.num_actors": 1}) == "async=2 engines=1"
    rows = [{**step_row(1.0, 0.5, 1.5, values_wall=0.2), "async/staleness": s} for s in (1.0, 2.0, 2.0)]
    deep = {"label": "async=2", "point": {"ppo.async_steps": 2}, **sweep.measure(rows, 16, 1)}
    assert deep["overlapped"] and deep["staleness_max"] == 2.0 and deep["staleness_mean"] == pytest.approx(5 / 3)
    said = sweep.advice(deep)
    assert "overlap here (ppo.async_steps=2: each batch is sampled 2 updates behind" in said
    # the depth from the measured staleness where the grid does not set it (a base config with overlap)
    assert "ppo.async_steps=2:" in sweep.advice({**deep, "point": {"resources.generation.num_actors": 1}})
    plain = {"label": "async=0", "point": {"ppo.async_steps": 0}, **sweep.measure([step_row(1.0, 0.5, 1.0)], 16, 1)}
    assert not plain["overlapped"] and "ppo.async_steps=1, or k to let generation run up to k" in sweep.advice(plain)


def test_outputs_name_the_best_point_and_keep_failed_ones(tmp_path):
    ok = {"label": "async=0", "point": {"ppo.async_steps": 0}, "status": "ok",
          **sweep.measure([step_row(1.0, 0.5, 2.0)], 16, 1)}
    better = {"label": "async=1", "point": {"ppo.async_steps": 1}, "status": "ok",
              **sweep.measure([step_row(1.0, 0.5, 1.5, values_wall=0.2)], 16, 1)}
    failed = {"label": "async=2", "point": {"ppo.async_steps": 2}, "status": "invalid", "error": "ppo.async_steps: bad"}
    result = {"config": "configs/tiny_cpu.yaml", "overrides": [], "grid": {"ppo.async_steps": [0, 1, 2]}, "steps": 1,
              "warmup": 0, "wall_s": 60.0, "machine": {"cpu_model": "test", "cpus": 2}, "points": [ok, better, failed]}
    paths = sweep.write_outputs(result, tmp_path)
    assert sweep.best_point(result["points"]) is better
    md = paths["md"].read_text()
    assert "**Best: async=1**" in md and "invalid: ppo.async_steps: bad" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid"] and rows[2]["error"] == "ppo.async_steps: bad"
    assert json.loads(paths["json"].read_text())["points"][1]["label"] == "async=1"
    assert paths["png"].stat().st_size > 10_000


def test_a_points_trackers_are_the_configs_but_tensorboard_grouped_under_the_sweep(tmp_path, monkeypatch):
    from rlhf_ray.cli.sweep import tracker_settings
    from rlhf_ray.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "sweep-b"
    assert tracker_settings(load_config(None).logging, out) == ["logging.trackers=[]"]
    both = load_config(None, ["logging.trackers=[tensorboard, wandb, mlflow]"]).logging
    assert tracker_settings(both, out) == ["logging.trackers=[wandb, mlflow]", "logging.group=sweep-b",
                                           f"logging.mlflow.tracking_uri=sqlite:///{out.resolve() / 'mlflow.db'}"]
    named = load_config(None, ["logging.trackers=[mlflow]", "logging.group=mine",
                               "logging.mlflow.tracking_uri=http://mlflow:5000"]).logging
    assert tracker_settings(named, out) == ["logging.trackers=[mlflow]"]
    points = [load_config(None, ["ppo.kl_coef=0.1", *tracker_settings(both, out)]) for _ in range(2)]
    assert {(cfg.logging.group, cfg.logging.mlflow.tracking_uri) for cfg in points} == {
        ("sweep-b", f"sqlite:///{out.resolve() / 'mlflow.db'}")}
