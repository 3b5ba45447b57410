"""The run's timeline: every actor's spans and the driver's on one time axis, written as ``<output_dir>/trace.json``
in the Chrome trace-event format (Perfetto, chrome://tracing and speedscope open it), and each role's idle share per
step in the metrics (``idle/<role>``) and the report.

Each step the driver takes the spans its actors recorded (rlhf_ray.runtime.spans; they come back with the memory
reading every step already makes, so no call is added) and its own. An actor's clock is set against the driver's
from those same calls (rlhf_ray.runtime.spans.ClockOffset): the trace holds each actor's offset and its bound (half
the tightest round trip seen) under ``otherData.clocks``. An actor's *idle share* of a step is the part of the step's
wall time (from the end of the previous step's record to this one's) that none of its spans covers; a role's is the
mean over its actors.

The file stays valid JSON after every step (the new events go before its closing part, which is rewritten). Past
``logging.trace_max_events`` it rolls over: the full file becomes ``trace-<first step>-<last step>.json`` and a new
``trace.json`` begins, so a long run keeps every step in parts of bounded size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf_ray.runtime.spans import ClockOffset

US = 1e6  # trace-event times are in microseconds


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] that the union of ``intervals`` covers."""
    total, reach = 0.0, start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total


def idle_shares(actors: dict[str, list[dict]], start: float, end: float) -> dict[str, float]:
    """``{role: idle share}`` over [start, end]: per actor ("<role>-<i>") 1 − covered / wall, the mean per role."""
    wall = max(end - start, 1e-9)
    shares: dict[str, list[float]] = {}
    for name, spans in actors.items():
        role = name.rsplit("-", 1)[0]
        busy = covered([(s["start"], s["end"]) for s in spans], start, end)
        shares.setdefault(role, []).append(1.0 - busy / wall)
    return {role: sum(v) / len(v) for role, v in shares.items()}


class TraceFile:
    """trace.json written step by step, valid after each; rolled over past ``max_events``."""

    def __init__(self, out_dir: str | Path, max_events: int):
        self.dir, self.max_events = Path(out_dir), max_events
        self.path = self.dir / "trace.json"
        self.ids: dict[str, int] = {}       # process name -> pid in the trace
        self.threads: dict[tuple[int, str], int] = {}
        self.events, self.first_step, self.last_step, self.end = 0, None, None, 0
        if self.path.exists():  # a resumed run: the earlier trace becomes a part of its own
            self.path.rename(self.unused_part_name("resumed"))

    def unused_part_name(self, tag: str) -> Path:
        n = 0
        while (self.dir / f"trace-{tag}-{n}.json").exists():
            n += 1
        return self.dir / f"trace-{tag}-{n}.json"

    def pid(self, process: str) -> int:
        if process not in self.ids:
            self.ids[process] = len(self.ids) + 1
        return self.ids[process]

    def tid(self, pid: int, thread: str) -> int:
        if (pid, thread) not in self.threads:
            self.threads[(pid, thread)] = sum(1 for p, _ in self.threads if p == pid) + 1
        return self.threads[(pid, thread)]

    def names(self) -> list[dict]:
        """The metadata events that name each process and thread (written at the head of every part)."""
        events = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
                  for name, pid in self.ids.items()]
        events += [{"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
                   for pid in self.ids.values()]
        return events + [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}
                         for (pid, thread), tid in self.threads.items()]

    def add(self, step: int, events: list[dict], other: dict) -> None:
        if self.events and self.events + len(events) > self.max_events:
            self.path.rename(self.dir / f"trace-{self.first_step}-{self.last_step}.json")
            self.events, self.end = 0, 0
        fresh = self.events == 0
        if fresh:
            self.first_step = step
            events = self.names() + events
        self.last_step = step
        body = ",\n".join(json.dumps(e, separators=(",", ":")) for e in events)
        tail = "\n],\n" + json.dumps({"displayTimeUnit": "ms", "otherData": other})[1:]  # '"displayTimeUnit": …}'
        mode = "w" if fresh else "r+"
        with open(self.path, mode) as f:
            if fresh:
                f.write('{"traceEvents": [\n')
            else:
                f.seek(self.end)
                f.write(",\n")
            f.write(body)
            self.end = f.tell()
            f.write(tail)
            f.truncate()
        self.events += len(events)


class Timeline:
    """One run's timeline: ``add_step`` takes the driver's and the actors' spans of a step, writes them to the trace
    (when ``write``) and returns the step's idle shares as metrics."""

    def __init__(self, out_dir: str | Path, write: bool = True, max_events: int = 200_000):
        self.trace = TraceFile(out_dir, max_events) if write else None
        self.clocks: dict[str, ClockOffset] = {}
        self.pids: dict[str, int | None] = {}

    def observe_clock(self, actor: str, sent: float, their_clock: float, received: float,
                      pid: int | None = None) -> None:
        """A reading of ``actor``'s clock during a call; a new process under the name (a replacement, maybe on
        another node) starts its estimate afresh."""
        if actor not in self.clocks or self.pids.get(actor) != pid:
            self.clocks[actor], self.pids[actor] = ClockOffset(), pid
        self.clocks[actor].observe(sent, their_clock, received)

    def aligned(self, actor: str, spans: list[dict]) -> list[dict]:
        clock = self.clocks.get(actor)
        if clock is None:
            return spans
        return [{**s, "start": clock.to_ours(s["start"]), "end": clock.to_ours(s["end"])} for s in spans]

    def add_step(self, step: int, start: float, end: float, driver: list[dict],
                 actors: dict[str, list[dict]]) -> dict[str, float]:
        """Spans in the driver's clock after ``aligned``; [start, end] the step's window. -> {"idle/<role>": share}."""
        if self.trace is not None:
            events = [self.event("driver", "step", {"name": f"step {step}", "start": start, "end": end,
                                                    "args": {}}, step)]
            events += [self.event("driver", s.get("thread", "MainThread"), s, step) for s in driver]
            for actor, spans in actors.items():
                events += [self.event(actor, "calls", s, step) for s in spans]
            self.trace.add(step, events, {"clocks": {actor: {"offset_s": c.offset, "bound_s": c.error}
                                                     for actor, c in self.clocks.items()},
                                          "pid": os.getpid()})
        return {f"idle/{role}": share for role, share in idle_shares(actors, start, end).items()}

    def event(self, process: str, thread: str, span: dict, step: int) -> dict:
        pid = self.trace.pid(process)
        start, end = round(span["start"] * US), round(span["end"] * US)  # whole µs: spans that meet stay apart
        return {"name": span["name"], "cat": process.rsplit("-", 1)[0], "ph": "X", "pid": pid,
                "tid": self.trace.tid(pid, thread), "ts": start, "dur": max(end - start, 0),
                "args": {"step": step, **span.get("args", {})}}


# ------------------------------------------------------------------------------------------------ the picture

def load_trace(path: str | Path) -> list[dict]:
    """A trace file's events (a part as well as trace.json)."""
    return json.loads(Path(path).read_text())["traceEvents"]


def draw_timeline(events: list[dict], out: str | Path, steps: int = 3) -> Path:
    """The last ``steps`` steps of a trace as a PNG: a row per process and thread (the driver's phases, each actor's
    calls), a bar per span coloured by its name, the steps' bounds as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    step_spans = sorted((e for e in spans if e["name"].startswith("step ")), key=lambda e: e["ts"])[-steps:]
    if not step_spans:
        raise ValueError("the trace has no steps")
    t0, t1 = step_spans[0]["ts"], step_spans[-1]["ts"] + step_spans[-1]["dur"]
    shown = [e for e in spans if e["ts"] + e["dur"] >= t0 and e["ts"] <= t1 and not e["name"].startswith("step ")]
    rows = sorted({(e["pid"], e["tid"]) for e in shown},
                  key=lambda k: (names.get(k[0]) != "driver", names.get(k[0], ""), k[1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {name: colors[i % len(colors)] for i, name in enumerate(sorted({e["name"] for e in shown}))}
    fig, ax = plt.subplots(figsize=(14, 0.55 * len(rows) + 1.6))
    for y, key in enumerate(rows):
        for e in (e for e in shown if (e["pid"], e["tid"]) == key):
            ax.broken_barh([((e["ts"] - t0) / US, e["dur"] / US)], (y - 0.38, 0.76), color=color_of[e["name"]])
    for e in step_spans:
        ax.axvline((e["ts"] - t0) / US, color="black", linestyle=":", linewidth=1)
        ax.text((e["ts"] - t0) / US, len(rows) - 0.4, f" {e['name']}", fontsize=8, va="bottom")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{names.get(p, p)}" + (f" · {threads[(p, t)]}" if threads.get((p, t)) not in (None, "calls",
                                                                                                       "MainThread")
                                                else "") for p, t in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    handles = [matplotlib.patches.Patch(color=c, label=n) for n, c in color_of.items()]
    ax.legend(handles=handles, fontsize=7, ncol=min(6, len(handles)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(f"timeline: the last {len(step_spans)} steps (driver phases, every actor's calls)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)

