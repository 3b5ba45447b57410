"""The timeline (rlhf_ray.run.timeline, rlhf_ray.runtime.spans) without a cluster: spans and their counts, clocks set
against the driver's with injected offsets, idle shares from overlapping spans, trace.json valid after every step,
rolled over and kept across a resume. A real run's trace: tests/test_console_and_report.py."""
from __future__ import annotations

import json
import time

import pytest

from rlhf_ray.run.timeline import Timeline, TraceFile, covered, idle_shares
from rlhf_ray.runtime import spans
from rlhf_ray.runtime.spans import ClockOffset, SpanRecorder


def test_spans_nest_carry_their_counts_and_are_taken_once():
    recorder = SpanRecorder(limit=3)
    with recorder.span("generate"):
        recorder.annotate(tokens=12)
        with recorder.span("inner", kind="x"):
            recorder.annotate(bytes=5)
    taken = recorder.take()
    inner, outer = taken["spans"]
    assert (outer["name"], outer["args"]) == ("generate", {"tokens": 12})
    assert (inner["name"], inner["args"]) == ("inner", {"kind": "x", "bytes": 5})
    assert outer["start"] <= inner["start"] <= inner["end"] <= outer["end"] <= taken["clock"]
    assert recorder.take()["spans"] == []
    recorder.annotate(tokens=1)  # outside any span: nothing to annotate, no error
    for i in range(5):
        with recorder.span(f"s{i}"):
            pass
    taken = recorder.take()
    assert [s["name"] for s in taken["spans"]] == ["s2", "s3", "s4"] and taken["dropped"] == 2


@pytest.mark.parametrize("offset", [0.0, 5.0, -3600.0])
def test_an_actors_clock_is_set_against_the_drivers_within_half_a_round_trip(monkeypatch, offset):
    """A node whose clock is off by ``offset``: its spans of a call, moved onto the driver's clock, lie inside the
    driver's window around that call (to the bound, half the tightest round trip)."""
    actor = ClockOffset()
    windows = []
    for delay in (0.02, 0.005, 0.03):  # round trips of several lengths: the tightest is kept
        sent = time.time()
        monkeypatch.setenv(spans.OFFSET_ENV, str(offset))
        recorder = SpanRecorder()
        time.sleep(delay / 2)
        with recorder.span("work"):
            time.sleep(0.001)
        taken = recorder.take()
        monkeypatch.delenv(spans.OFFSET_ENV)
        time.sleep(delay / 2)
        received = time.time()
        actor.observe(sent, taken["clock"], received)
        windows.append((sent, received, taken["spans"][0]))
    assert actor.offset == pytest.approx(offset, abs=0.01) and actor.error < 0.01
    for sent, received, work in windows:
        start, end = actor.to_ours(work["start"]), actor.to_ours(work["end"])
        assert sent - actor.error <= start <= end <= received + actor.error


def test_idle_share_is_the_part_of_the_step_no_span_of_the_actor_covers():
    assert covered([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert covered([(-5, 1), (9, 20)], 0, 10) == 2  # cut to the window
    actors = {"generation-0": [{"start": 0, "end": 6}],
              "generation-1": [{"start": 0, "end": 2}, {"start": 1, "end": 4}],
              "learner-0": [], "reward-0": [{"start": 6, "end": 7}, {"start": 6.5, "end": 8}]}
    shares = idle_shares(actors, 0.0, 10.0)
    assert shares == pytest.approx({"generation": 0.5, "learner": 1.0, "reward": 0.8})


def test_the_trace_is_valid_after_every_step_rolls_over_and_a_resume_keeps_the_earlier_one(tmp_path):
    timeline = Timeline(tmp_path, max_events=20)
    t = 1000.0
    for step in range(1, 6):
        actors = {"generation-0": [{"name": "generate", "start": t, "end": t + 0.5, "thread": "MainThread",
                                    "args": {"tokens": 64}}],
                  "learner-0": [{"name": "train", "start": t + 0.5, "end": t + 0.9, "thread": "MainThread",
                                 "args": {}}]}
        driver = [{"name": "generate", "start": t, "end": t + 0.5, "thread": "MainThread", "args": {}}]
        timeline.observe_clock("generation-0", t, t + 0.01, t + 0.02)
        shares = timeline.add_step(step, t, t + 1.0, driver, actors)
        assert shares == pytest.approx({"idle/generation": 0.5, "idle/learner": 0.6})
        trace = json.loads((tmp_path / "trace.json").read_text())  # valid after each step
        assert trace["otherData"]["clocks"]["generation-0"]["bound_s"] == pytest.approx(0.01)
        t += 1.0
    parts = sorted(p.name for p in tmp_path.glob("trace-*.json"))
    assert parts == ["trace-1-2.json", "trace-3-4.json"]  # 4 spans a step + 9 naming events a part: 2 steps
    events = [e for name in [*parts, "trace.json"] for e in json.loads((tmp_path / name).read_text())["traceEvents"]]
    spans_of = lambda name: [e for e in events if e["ph"] == "X" and e["name"] == name]  # noqa: E731
    assert [e["args"]["step"] for e in spans_of("generate") if e["cat"] == "generation"] == [1, 2, 3, 4, 5]
    assert spans_of("step 3")[0]["ts"] == 1002_000_000 and spans_of("step 3")[0]["dur"] == 1_000_000
    # spans that meet (step 2 ends where step 3 begins) stay apart in whole microseconds, even at awkward times
    third = timeline.event("driver", "step", {"name": "x", "start": 1e9 + 0.1234567, "end": 1e9 + 0.7654321}, 0)
    fourth = timeline.event("driver", "step", {"name": "y", "start": 1e9 + 0.7654321, "end": 1e9 + 0.9}, 0)
    assert third["ts"] + third["dur"] == fourth["ts"]
    for part in [*parts, "trace.json"]:  # every part names its processes and threads
        names = {e["args"]["name"] for e in json.loads((tmp_path / part).read_text())["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "process_name"}
        assert names == {"driver", "generation-0", "learner-0"}
    assert_nested_or_disjoint(events)
    # a replacement under the same name (another process, maybe another node): its clock is estimated afresh
    timeline.observe_clock("generation-0", t, t + 7.0, t + 0.5, pid=99)
    assert timeline.clocks["generation-0"].offset == pytest.approx(6.75)
    Timeline(tmp_path)  # a resumed run: the trace so far is kept as a part of its own
    assert (tmp_path / "trace-resumed-0.json").is_file() and not (tmp_path / "trace.json").exists()


def assert_nested_or_disjoint(events: list[dict]) -> None:
    """Per process and thread, any two complete events are nested or disjoint (what a trace viewer can draw)."""
    by_thread: dict[tuple, list] = {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans_ in by_thread.values():
        for a0, a1 in spans_:
            for b0, b1 in spans_:
                assert a1 <= b0 or b1 <= a0 or (a0 <= b0 and b1 <= a1) or (b0 <= a0 and a1 <= b1), (a0, a1, b0, b1)


def test_the_timeline_picture_of_the_last_steps(tmp_path):
    from rlhf_ray.run.report import main as report

    timeline = Timeline(tmp_path)
    for step in range(1, 4):
        t = 1000.0 + step
        timeline.add_step(step, t, t + 1, [{"name": "generate", "start": t, "end": t + 0.5, "args": {}}],
                          {"generation-0": [{"name": "generate", "start": t, "end": t + 0.5, "args": {}}]})
    assert report([str(tmp_path), "--timeline", "2"]) == 0 and (tmp_path / "timeline.png").stat().st_size > 10_000
    assert report([str(tmp_path / "missing"), "--timeline", "2"]) == 2
