"""Alarms: rules over a run's metric stream that say, while it runs, that the policy may be gaming its reward or the
run has gone wrong — instead of someone finding it in the samples afterwards.

Each rule reads the steps logged so far (``metrics.jsonl``'s rows, the newest last) and its threshold in
``logging.alarm_thresholds`` (null turns it off). A rule whose metrics a run does not log (SFT, DPO and RM training
have no KL or responses) stays silent. Where a rule compares with the start of the run, its *baseline* is the mean of
the first ``baseline_steps`` steps that log the metric; a trend is over the last ``window`` steps.

    kl_high              kl/mean (nats per response, summed over its tokens) > kl_max
    length_collapse      response/length_mean < length_collapse × baseline
    length_blowup        response/length_mean > length_blowup × baseline
    eos_collapse         response/eos_fraction < eos_collapse × baseline (a baseline of at least 0.1)
    entropy_collapse     entropy < entropy_collapse × baseline
    reward_vs_reference  score/mean rose over the window while ref/logprob_mean (the reference's log-prob per response
                         token) fell over it and lies more than ref_logprob_drop below its baseline: the responses earn
                         more while leaving what the reference would write
    sampler_gap_growing  kl/sampler_vs_learner (mean |sampler − learner| log-prob per token) > sampler_gap_max and
                         rose over the window: the engines' weights drift from the learner's
    penalty_pays         score/cut_pays = 1: a response cut at generation.max_new_tokens earns ppo.non_eos_penalty,
                         more than the median finished response, so the policy learns to ramble

An alarm fires once per run (one console line, ``alarm/<rule>`` = 1 in that step's metrics, a marker in the report);
with ``logging.alarms: stop`` the run then ends with a checkpoint (exit code 3).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

ALARM_PREFIX = "alarm/"
EXIT_CODE = 3  # the run was stopped by an alarm (logging.alarms=stop)


@dataclass(frozen=True)
class Alarm:
    rule: str
    step: int
    message: str

    def line(self) -> str:
        return f"alarm {self.rule} at step {self.step}: {self.message}"


# ------------------------------------------------------------------------------------------------ series

def series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def baseline(rows: list[dict], key: str, steps: int) -> Optional[float]:
    """The mean of ``key`` over its first ``steps`` values — None until there are more values than that (the baseline
    is not compared with itself)."""
    values = series(rows, key)
    return sum(values[:steps]) / steps if len(values) > steps else None


def slope(values: list[float]) -> float:
    """The least-squares slope of ``values`` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    spread = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / spread if spread else 0.0


# ------------------------------------------------------------------------------------------------ rules

Rule = Callable[[list[dict], object], Optional[str]]  # (rows so far, thresholds) -> why it fires, or None
RULES: dict[str, tuple[str, Rule]] = {}  # name -> (its threshold's key, the rule)


def rule(name: str, key: str):
    def register(fn: Rule) -> Rule:
        RULES[name] = (key, fn)
        return fn
    return register


def _latest(rows: list[dict], key: str) -> Optional[float]:
    value = rows[-1].get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _against_baseline(rows, t, key: str, factor: float, below: bool, what: str) -> Optional[str]:
    now, start = _latest(rows, key), baseline(rows, key, t.baseline_steps)
    if now is None or start is None or start <= 0:
        return None
    if (now < factor * start) if below else (now > factor * start):
        return (f"{key} {now:.3g} is {'below' if below else 'above'} {factor:g} × its first steps' {start:.3g} "
                f"({what})")
    return None


@rule("kl_high", "kl_max")
def kl_high(rows, t):
    kl = _latest(rows, "kl/mean")
    if kl is not None and kl > t.kl_max:
        return f"kl/mean {kl:.3g} nats per response is above logging.alarm_thresholds.kl_max={t.kl_max:g}"
    return None


@rule("length_collapse", "length_collapse")
def length_collapse(rows, t):
    return _against_baseline(rows, t, "response/length_mean", t.length_collapse, True,
                             "logging.alarm_thresholds.length_collapse: the responses are collapsing")


@rule("length_blowup", "length_blowup")
def length_blowup(rows, t):
    return _against_baseline(rows, t, "response/length_mean", t.length_blowup, False,
                             "logging.alarm_thresholds.length_blowup: the responses are blowing up")


@rule("eos_collapse", "eos_collapse")
def eos_collapse(rows, t):
    start = baseline(rows, "response/eos_fraction", t.baseline_steps)
    if start is None or start < 0.1:  # a run that hardly finishes a response from the start has nothing to lose
        return None
    return _against_baseline(rows, t, "response/eos_fraction", t.eos_collapse, True,
                             "logging.alarm_thresholds.eos_collapse: fewer responses end with EOS")


@rule("entropy_collapse", "entropy_collapse")
def entropy_collapse(rows, t):
    return _against_baseline(rows, t, "entropy", t.entropy_collapse, True,
                             "logging.alarm_thresholds.entropy_collapse: the policy is turning deterministic")


@rule("reward_vs_reference", "ref_logprob_drop")
def reward_vs_reference(rows, t):
    scores, reference = series(rows, "score/mean"), series(rows, "ref/logprob_mean")
    start = baseline(rows, "ref/logprob_mean", t.baseline_steps)
    if start is None or len(scores) < t.window or len(reference) < t.window:
        return None
    rising, falling = slope(scores[-t.window:]), slope(reference[-t.window:])
    if rising > 0 and falling < 0 and reference[-1] < start - t.ref_logprob_drop:
        return (f"score/mean rose over the last {t.window} steps while ref/logprob_mean fell to {reference[-1]:.3g} "
                f"nats per token, more than logging.alarm_thresholds.ref_logprob_drop={t.ref_logprob_drop:g} below "
                f"its first steps' {start:.3g}: the reward may be gamed — read the samples")
    return None


@rule("sampler_gap_growing", "sampler_gap_max")
def sampler_gap_growing(rows, t):
    gaps = series(rows, "kl/sampler_vs_learner")
    if len(gaps) < t.window or gaps[-1] <= t.sampler_gap_max or slope(gaps[-t.window:]) <= 0:
        return None
    return (f"kl/sampler_vs_learner {gaps[-1]:.3g} nats per token is above logging.alarm_thresholds.sampler_gap_max="
            f"{t.sampler_gap_max:g} and grew over the last {t.window} steps: the engines' weights drift from the "
            "learner's (weight sync, dtype)")


@rule("penalty_pays", "penalty_pays")
def penalty_pays(rows, t):
    if not t.penalty_pays or _latest(rows, "score/cut_pays") != 1.0:
        return None
    median = _latest(rows, "score/finished_median")
    return ("ppo.non_eos_penalty is above the median score of finished responses"
            + (f" ({median:.3g})" if median is not None else "")
            + ": a response cut at generation.max_new_tokens earns more than most finished ones, so the policy learns "
              "to ramble. Lower the penalty below the reward's range, or set ppo.non_eos_penalty_mode=subtract")


# ------------------------------------------------------------------------------------------------ monitor

class AlarmMonitor:
    """The rules over one run's steps. ``history``: the steps logged before (a resumed run's metrics.jsonl up to its
    checkpoint) — the baselines and trends go on from them, and an alarm that fired there does not fire again."""

    def __init__(self, thresholds, mode: str = "warn", history: list[dict] = ()):
        self.thresholds, self.mode = thresholds, mode
        self.rows = list(history)

    @property
    def fired(self) -> set[str]:
        return {k[len(ALARM_PREFIX):] for row in self.rows for k in row if k.startswith(ALARM_PREFIX)}

    def check(self, metrics: dict) -> list[Alarm]:
        """The alarms ``metrics`` (the step just finished, before it is logged) sets off: each marked in ``metrics``
        as alarm/<rule> = 1 and said on the console in one line."""
        if self.mode == "off":
            return []
        self.rows.append(metrics)
        fired, alarms = self.fired, []
        for name, (key, fn) in RULES.items():
            if name in fired or getattr(self.thresholds, key) in (None, False):
                continue
            why = fn(self.rows, self.thresholds)
            if why:
                alarms.append(Alarm(name, int(metrics.get("step", len(self.rows))), why))
                metrics[ALARM_PREFIX + name] = 1.0
        for alarm in alarms:
            log.warning("%s", alarm.line())
        return alarms

    def rewind(self, step: int) -> None:
        """Forget the steps after ``step`` (a learner restart runs them again)."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
