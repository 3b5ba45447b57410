"""The alarms (rlhf_ray.run.alarms) on recorded metric streams, one per rule: each fires at the step its rule is
first met and not before, once; a healthy stream, a learner run's stream and thresholds set to null fire nothing; a
resumed run goes on from its history; the report marks them. How a run stops on one: tests/test_run_endings.py."""
from __future__ import annotations

import pytest

from rlhf_ray.config.sections import AlarmThresholds
from rlhf_ray.run.alarms import RULES, AlarmMonitor, slope

T = AlarmThresholds()


def stream(n: int, **series) -> list[dict]:
    """``n`` healthy PPO steps (1 …), with ``series`` (key -> values by step index, or a function of it) on top."""
    rows = []
    for i in range(n):
        row = {"step": i + 1, "kl/mean": 0.5 + 0.1 * i, "response/length_mean": 100.0 + (i % 3),
               "response/eos_fraction": 0.8, "entropy": 2.0 - 0.01 * i, "score/mean": 0.1 * i,
               "ref/logprob_mean": -2.0 - 0.02 * i, "kl/sampler_vs_learner": 1e-6, "loss/policy": 0.1}
        for key, values in series.items():
            row[key] = values(i) if callable(values) else values[i]
        rows.append(row)
    return rows


def fired(rows: list[dict], thresholds=T, mode: str = "warn", history=()) -> list[tuple[int, str]]:
    monitor = AlarmMonitor(thresholds, mode, history=list(history))
    return [(alarm.step, alarm.rule) for row in rows for alarm in monitor.check(dict(row))]


# each rule: a stream that trips it first at step 8 (index 7)
TRIPS = {
    "kl_high": {"kl/mean": lambda i: 25.0 if i >= 7 else 1.0},
    "length_collapse": {"response/length_mean": lambda i: 20.0 if i >= 7 else 100.0},
    "length_blowup": {"response/length_mean": lambda i: 400.0 if i >= 7 else 100.0},
    "eos_collapse": {"response/eos_fraction": lambda i: 0.2 if i >= 7 else 0.8},
    "entropy_collapse": {"entropy": lambda i: 0.3 if i >= 7 else 2.0},
    # the score climbs all along; the reference's log-prob falls from step 4 on and passes 1 nat below its start at 8
    "reward_vs_reference": {"ref/logprob_mean": lambda i: -2.0 - 0.3 * max(0, i - 3)},
    "sampler_gap_growing": {"kl/sampler_vs_learner": lambda i: 0.015 * i},
    "penalty_pays": {"score/cut_pays": lambda i: float(i >= 7), "score/finished_median": lambda i: -3.5},
}


def test_every_rule_has_a_recorded_stream_that_trips_it():
    assert set(TRIPS) == set(RULES)


@pytest.mark.parametrize("rule", sorted(TRIPS))
def test_each_rule_fires_once_at_the_step_it_is_met(rule, caplog):
    rows = stream(12, **TRIPS[rule])
    with caplog.at_level("WARNING", logger="rlhf_ray.run.alarms"):
        assert fired(rows) == [(8, rule)]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"alarm {rule} at step 8: ") and "\n" not in line
    key = RULES[rule][0]
    assert fired(rows, T.model_copy(update={key: None})) == []           # null: the rule is off
    assert fired(rows, mode="off") == []


def test_a_healthy_run_and_a_learner_run_fire_nothing():
    assert fired(stream(40)) == []
    assert fired([{"step": i, "loss/sft": 2.0 - 0.01 * i, "time/step": 0.5} for i in range(1, 40)]) == []


def test_the_step_that_fires_carries_its_marker_and_the_baseline_is_not_compared_with_itself():
    monitor = AlarmMonitor(T)
    rows = stream(8, **TRIPS["length_collapse"])
    logged = []
    for row in rows:
        monitor.check(row)
        logged.append(row)
    assert [r["step"] for r in logged if "alarm/length_collapse" in r] == [8]
    # a collapse within the baseline's own steps is the baseline: nothing to compare yet
    assert fired(stream(3, **{"response/length_mean": [100.0, 10.0, 10.0]})) == []


def test_a_resumed_run_goes_on_from_its_history_and_a_rewind_forgets_the_steps_after():
    rows = stream(12, **TRIPS["kl_high"])
    before, after = rows[:9], rows[9:]
    history = [dict(r) for r in before]
    AlarmMonitor(T).check(history[7])                                       # step 8 fired and was logged
    assert "alarm/kl_high" in history[7]
    assert fired(after, history=history) == []                             # not again after the resume
    # baselines come from the history: a collapse right after a resume is seen at once
    collapse = stream(12, **TRIPS["length_collapse"])
    assert fired(collapse[7:8], history=collapse[:7]) == [(8, "length_collapse")]
    monitor = AlarmMonitor(T, history=history)
    monitor.rewind(7)                                                       # a learner restart back to step 7
    assert [r["step"] for r in monitor.rows] == list(range(1, 8))
    assert [a.rule for a in monitor.check(dict(rows[7]))] == ["kl_high"]    # step 8 again: it fires again


def test_slope():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0) and slope([3.0, 3.0]) == 0.0 and slope([5.0]) == 0.0


def test_the_report_marks_each_alarm_and_its_summary_names_it(tmp_path):
    from rlhf_ray.run.report import alarms_of, draw, summary

    rows = stream(10, **TRIPS["kl_high"], **{"time/step": [1.0] * 10, "reward/mean": [0.0] * 10,
                                            "response/tokens": [100.0] * 10})
    rows[7]["alarm/kl_high"] = 1.0
    assert alarms_of(rows) == [(8, "kl_high")]
    assert summary(rows).endswith("; alarms: kl_high (step 8)")
    assert draw({"run": rows}, tmp_path / "report.png").stat().st_size > 0

