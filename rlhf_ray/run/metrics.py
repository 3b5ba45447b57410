"""Per-step metrics to <output_dir>/metrics.jsonl and the run's trackers (TensorBoard, W&B, MLflow:
rlhf_ray.run.trackers); sampled rows to samples.jsonl.

A resumed run (or a learner group restarted from a checkpoint) first rewinds these to the checkpoint's
step, so that every step appears exactly once however often the run was interrupted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULT_FILES = ("metrics.jsonl", "samples.jsonl")


class MetricsLogger:
    """``trackers``: rlhf_ray.run.trackers.Trackers (None: metrics.jsonl and samples.jsonl only)."""

    def __init__(self, output_dir: str | Path, trackers=None, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trackers = trackers
        self.jsonl = self.samples = None
        self._open(purge_after=resume_step)

    def _open(self, purge_after: int | None) -> None:
        if purge_after is not None:
            for name in RESULT_FILES:
                keep_steps_up_to(self.dir / name, purge_after)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: readable while running
        self.samples = open(self.dir / "samples.jsonl", "a", buffering=1)
        if self.trackers is not None:  # a new record in each, holding the steps kept
            kept = read_rows(self.dir / "metrics.jsonl") if purge_after else []
            self.trackers.start(kept, purge_after or 0)

    def rewind(self, step: int) -> None:
        """Forget every step after ``step`` (they will be run again)."""
        self.close()
        self._open(purge_after=step)

    def log(self, metrics: dict) -> None:
        self.jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in metrics.items()}) + "\n")
        if self.trackers is not None:
            self.trackers.log(metrics)

    def log_samples(self, samples: list[dict]) -> None:
        for sample in samples:
            self.samples.write(json.dumps(sample, ensure_ascii=False) + "\n")

    def finish(self, final_model: str | None) -> list[str]:
        """The run ended normally: the trackers get the samples table and the final model's location. Returns where
        their records are, for the closing lines."""
        if self.trackers is None:
            return []
        self.samples.flush()
        self.trackers.finish(read_rows(self.dir / "samples.jsonl"), final_model)
        return self.trackers.where()

    def close(self) -> None:
        """Close every file and tracker even if one fails (a full disk fails the last flush); then raise the first
        failure."""
        failure = None
        for writer in (self.jsonl, self.samples, self.trackers):
            try:
                if writer is not None:
                    writer.close()
            except Exception as err:
                failure = failure or err
        if failure is not None:
            raise failure

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON Lines file (a line cut off by a crash is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite a JSON Lines file keeping the rows of steps ≤ ``step`` (atomically: write, then rename)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut off by a crash: dropped
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def logged_steps(output_dir: str | Path) -> list[dict]:
    """The steps in ``<output_dir>/metrics.jsonl`` (rlhf_ray.run.report.load_metrics), none where there are none."""
    from rlhf_ray.run.report import load_metrics

    try:
        return load_metrics(output_dir)
    except (FileNotFoundError, ValueError):
        return []
