"""What a run of the learner over a fixed dataset does the same way, whatever it trains (reward-model training:
rlhf_ray.drivers.reward_model, SFT: rlhf_ray.drivers.sft, DPO: rlhf_ray.drivers.dpo). One step:

    rows of step s (a pure function of seed and s) → learner update → metrics → evaluation / checkpoint when due

Evaluation sets are evaluated before training (step 0: the baseline), every ``eval_every_steps`` and at the end
(eval.json); the run ends with the final model in <output_dir>/final_model. A driver says what is its own:
``batch`` (the step's rows as the learner reads them), ``evaluate`` (a table per evaluation set), ``describe_set``,
``progress``, and optionally ``step_metrics``, ``restore_driver_files``, ``after_final`` and ``closing_extra``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlhf_ray.config import LoRAConfig
from rlhf_ray.drivers.base import CheckpointedDriver
from rlhf_ray.models.specs import resolve_model
from rlhf_ray.objectives import LearnerSpec
from rlhf_ray.run import preflight
from rlhf_ray.run.report import peak_memory
from rlhf_ray.runtime.signals import STOP_SIGNALS

log = logging.getLogger(__name__)


class DatasetDriver(CheckpointedDriver):
    schedule = "training"     # the config section with epochs, eval_every_steps and eval_at_start
    loss_key = ""             # the training loss in metrics.jsonl
    eval_figures: tuple[str, ...] = ()  # per evaluation set: the figures logged as eval/<set>/<figure>

    def __init__(self, cfg):
        self.cfg = cfg
        self.final_eval: dict = {}
        self.start_up()  # rlhf_ray.drivers.base: the run's own steps, in the order every driver starts in
        if self.section.eval_at_start and self.step_count == 0 and self.eval_sets:
            tables = self.evaluate()
            self.metrics_log.log({"step": 0, **self.eval_metrics(tables)})
            log.info("before training: %s", "; ".join(self.describe_set(n, t) for n, t in tables.items()))

    @property
    def section(self):
        return getattr(self.cfg, self.schedule)

    def learner_spec(self, objective: str, model: str, **extra) -> LearnerSpec:
        """The learner group: ``objective`` on ``model``, batches and epochs from the run's schedule section."""
        cfg, learner = self.cfg, self.cfg.resources.learner
        return LearnerSpec(objective=objective, model=model, world_size=learner.num_actors, num_cpus=learner.num_cpus,
                           num_gpus=learner.num_gpus, mini_batch_size=self.section.batch_size,
                           micro_batch_size=self.section.micro_batch_size, epochs=1, optimizer_steps=self.num_steps,
                           optimizer=cfg.optimizer, deepspeed=cfg.deepspeed, timeout_s=cfg.timeouts.learn_s,
                           seed=cfg.seed, export_dtype=cfg.dtype, pad_token_id=self.tokenizer.pad_token_id, **extra)

    def say_lora(self, lora: LoRAConfig | None, reference: bool = False) -> None:
        """The console's line on a LoRA learner (SFT, DPO): what trains and what stays frozen."""
        if lora is None:
            return
        trainable, frozen = self.roles.learner_parameters(), self.roles.learner_parameters(trainable=False)
        log.info("lora: the model trains as rank-%d adapters, %.2f M parameters, on its frozen %.1f M%s",
                 lora.rank, trainable / 1e6, frozen / 1e6, "; the reference is that base with the adapters off, "
                 "computed in the learner (no reference actors)" if reference else "")

    def resolve_models(self) -> None:
        """The one model a run of this kind trains (``model``: a name or a path), resolved and checked."""
        cfg = self.cfg
        self.model_path = resolve_model(cfg.model, cfg.cache_dir, cfg.seed)
        preflight.check_model_path(cfg.model, self.model_path, "model")

    # ------------------------------------------------------------------------------------------ a step
    def _step(self) -> dict[str, float]:
        started = time.perf_counter()
        indices = self.sampler.batch(self.step_count)
        batch = self.batch(indices)
        with STOP_SIGNALS.deferred():
            self.updating = True  # until the step is recorded: an error here leaves no checkpointable state
            stats, learn_s = self.roles.learn(batch)
            self.step_count += 1
            seconds = time.perf_counter() - started
            metrics = {"step": self.step_count, "epoch": self.sampler.position(self.step_count - 1)[0], **stats,
                       "time/step": seconds, "time/learn": learn_s, **self.step_metrics(indices, batch, seconds),
                       **self.roles.memory(),
                       "recovery/learner_restarts": float(self.roles.restarts["learner"])}
            if self.due(self.section.eval_every_steps):
                metrics.update(self.eval_metrics(self.evaluate()))
            self.record(metrics)
            self.updating = False
            if self.due(self.cfg.checkpoint.every_steps):
                self.save_checkpoint()
        return metrics

    def batch(self, indices: list[int]):
        raise NotImplementedError

    def step_metrics(self, indices: list[int], batch, seconds: float) -> dict[str, float]:
        """The step's own figures beside the learner's (throughput, …)."""
        return {}

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, dict]:
        """A table per evaluation set, by the learners' current model."""
        raise NotImplementedError

    def eval_metrics(self, tables: dict) -> dict[str, float]:
        """eval/<set>/<figure> of every table, and eval/<set>/accuracy/<source> where a table has sources."""
        metrics = {}
        for name, table in tables.items():
            metrics.update({f"eval/{name}/{figure}": table[figure] for figure in self.eval_figures})
            metrics.update({f"eval/{name}/accuracy/{source}": row["accuracy"]
                            for source, row in table.get("per_source", {}).items()})
        return metrics

    def describe_set(self, name: str, table: dict) -> str:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- durability
    def restore(self, path) -> None:
        self.restore_learners(path)
        self.restore_driver_files(Path(path))
        log.info("resumed from %s: %d of %d steps done", path, self.step_count, self.num_steps)

    def restore_driver_files(self, directory: Path) -> None:
        """Read back what ``save_driver_files`` kept in checkpoint ``directory``."""

    def finish(self) -> str:
        """Checkpoint (checkpoint.at_end), final evaluation (eval.json), the final model (final_model)."""
        self.checkpoint_at_end()
        out = Path(self.cfg.output_dir).resolve()
        tables = self.evaluate()
        self.final_eval = {name: {k: v for k, v in t.items() if not k.startswith("_")} for name, t in tables.items()}
        (out / "eval.json").write_text(json.dumps({"step": self.step_count, "sets": self.final_eval}, indent=2))
        self.metrics_log.log({"step": self.step_count, **self.eval_metrics(tables)})
        final = self.roles.save(str(out / "final_model"))
        self.after_final(final, tables)
        return final

    def after_final(self, final: str, tables: dict) -> None:
        """More files for the final model (a reward model's score statistics)."""

    def closing(self) -> list[str]:
        """The report picture (logging.report), each evaluation set's final figures, the training in one line."""
        rows = [json.loads(line) for line in (Path(self.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if self.loss_key in r]
        lines = self.drawn_report() + [self.describe_set(n, t) for n, t in self.final_eval.items()]
        if steps:
            seconds = sum(r["time/step"] for r in steps)
            memory = peak_memory(steps)
            lines.append(f"{len(steps)} steps in {seconds:.0f} s; loss {steps[0][self.loss_key]:.3f} → "
                         f"{steps[-1][self.loss_key]:.3f}{self.closing_extra(steps, seconds)}"
                         + (f"; peak GB: {memory}" if memory else ""))
        return lines

    def closing_extra(self, steps: list[dict], seconds: float) -> str:
        return ""
