"""Per-step metrics to <output_dir>/metrics.jsonl and TensorBoard; sampled rows to samples.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: readable while running
        self.samples = open(self.dir / "samples.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

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
        self.jsonl.close()
        self.samples.close()
        if self.tb:
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
