"""Per-step metrics to <output_dir>/metrics.jsonl and TensorBoard; sampled rows to samples.jsonl.

A resumed run (or a learner group restarted from a checkpoint) first rewinds these to the checkpoint's
step, so that every step appears exactly once however often the run was interrupted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULT_FILES = ("metrics.jsonl", "samples.jsonl")


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.use_tensorboard = tensorboard
        self.jsonl = self.samples = self.tb = None
        self._open(purge_after=resume_step)

    def _open(self, purge_after: int | None) -> None:
        if purge_after is not None:
            for name in RESULT_FILES:
                keep_steps_up_to(self.dir / name, purge_after)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: readable while running
        self.samples = open(self.dir / "samples.jsonl", "a", buffering=1)
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of the steps that are about to be redone
            self.tb = SummaryWriter(str(self.dir / "tensorboard"),
                                    purge_step=None if purge_after is None else purge_after + 1)

    def rewind(self, step: int) -> None:
        """Forget every step after ``step`` (they will be run again)."""
        self.close()
        self._open(purge_after=step)

    def log(self, metrics: dict) -> None:
        step = int(metrics["step"])
        self.jsonl.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in metrics.items()}) + "\n")
        if self.tb:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def log_samples(self, samples: list[dict]) -> None:
        for sample in samples:
            self.samples.write(json.dumps(sample, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Close every file even if one fails (a full disk fails the last flush); then raise the first failure."""
        failure = None
        for writer in (self.jsonl, self.samples, self.tb):
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
