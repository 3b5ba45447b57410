"""The SFT driver. One step:

    rows of step s (a pure function of seed and s) → learner update (the loss on assistant tokens) → metrics
    → evaluation / checkpoint when due

The learner is the generic one (rlhf_ray.objectives.sft). Conversations are encoded with a loss mask found by
rendering (rlhf_ray.conversations); with data.packing several go in a row, each attending only to itself.
<output_dir>/final_model is the fine-tuned policy; eval.json holds the loss and perplexity on assistant tokens per
evaluation set.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

from rlhf_ray import preflight
from rlhf_ray.batch import SequenceBatch
from rlhf_ray.cluster.roles import ActorLost, Roles
from rlhf_ray.cluster.signals import STOP_SIGNALS
from rlhf_ray.config import SFTConfig
from rlhf_ray.conversations import EncodedConversation, PackedRow, load_sft_conversations, pack
from rlhf_ray.data import PromptSampler, dataset_names
from rlhf_ray.drivers.base import CheckpointedDriver, evaluate_rows
from rlhf_ray.models.specs import resolve_model
from rlhf_ray.objectives import LearnerSpec

log = logging.getLogger(__name__)


def as_rows(conversations: list[EncodedConversation]) -> list[PackedRow]:
    """One conversation per row (no packing)."""
    return [PackedRow(c.input_ids, c.loss_mask, list(range(len(c.input_ids))), [len(c.input_ids)])
            for c in conversations]


def sequence_batch(rows: list[PackedRow], indices: list[int], pad_token_id: int) -> SequenceBatch:
    return SequenceBatch.from_rows([(rows[i].input_ids, rows[i].loss_mask, rows[i].sequence_lengths) for i in indices],
                                   pad_token_id)


class SFTTrainer(CheckpointedDriver):
    unit, exported = "SFT", "policy"  # for the console (rlhf_ray.train.run)

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.start_up()  # rlhf_ray.drivers.base: the steps below, in the order every driver starts in
        self.final_eval: dict = {}
        if cfg.training.eval_at_start and self.step_count == 0 and self.eval_sets:
            tables = self.evaluate()
            self.metrics_log.log({"step": 0, **self._eval_metrics(tables)})
            log.info("before training: %s", describe(tables))

    # ------------------------------------------------------------------------------------ startup
    def resolve_models(self) -> None:
        cfg = self.cfg
        self.model_path = resolve_model(cfg.model, cfg.cache_dir, cfg.seed)
        preflight.check_model_path(cfg.model, self.model_path, "model")

    def load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, data = self.cfg, self.cfg.data
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        load = lambda source: load_sft_conversations(source, data.split, data.template, self.tokenizer,  # noqa: E731
                                                     data.max_length, data.messages_field).rows
        conversations = load(data.train)
        order = list(range(len(conversations)))
        random.Random(f"{cfg.seed}:heldout").shuffle(order)
        held = set(order[:round(data.holdout_fraction * len(order))])
        train = [c for i, c in enumerate(conversations) if i not in held]
        if data.limit and data.limit < len(train):
            train = random.Random(cfg.seed).sample(train, data.limit)
        sets = {"heldout": [conversations[i] for i in sorted(held)]} if held else {}
        for name, source in zip(dataset_names(data.eval, taken=("heldout", "train")), data.eval):
            sets[name] = load(source)
        self.eval_sets = {name: as_rows(rows) for name, rows in sets.items()}
        self.train_rows = pack(train, data.max_length) if data.packing else as_rows(train)
        tokens = sum(len(r.input_ids) for r in self.train_rows)
        log.info("train: %d conversations in %d rows (%s), %d tokens, %d of them learned; %s", len(train),
                 len(self.train_rows), "packed" if data.packing else "one per row", tokens,
                 sum(sum(r.loss_mask) for r in self.train_rows),
                 ", ".join(f"{name}: {len(rows)} conversations" for name, rows in self.eval_sets.items()) or "no eval sets")
        self.sampler = PromptSampler(len(self.train_rows), cfg.training.batch_size, cfg.seed, what="training rows",
                                     key="training.batch_size")
        self.num_steps = cfg.training.epochs * self.sampler.batches_per_epoch

    def start_roles(self) -> Roles:
        return Roles(self.cfg, None, self._learner(), roles=("learner",))

    def _learner(self) -> LearnerSpec:
        cfg, learner = self.cfg, self.cfg.resources.learner
        return LearnerSpec(objective="sft", model=self.model_path, world_size=learner.num_actors,
                           num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                           mini_batch_size=cfg.training.batch_size, micro_batch_size=cfg.training.micro_batch_size,
                           epochs=1, optimizer_steps=self.num_steps, optimizer=cfg.optimizer, deepspeed=cfg.deepspeed,
                           timeout_s=cfg.timeouts.learn_s, seed=cfg.seed, export_dtype=cfg.dtype,
                           pad_token_id=self.tokenizer.pad_token_id, sft_loss_mean=cfg.training.loss_mean)

    # ------------------------------------------------------------------------------------------ a step
    def step(self) -> dict[str, float]:
        try:
            return self._step()
        except ActorLost as lost:
            self.recover_learner(lost)
            return {}

    def _step(self) -> dict[str, float]:
        started = time.perf_counter()
        indices = self.sampler.batch(self.step_count)
        batch = sequence_batch(self.train_rows, indices, self.tokenizer.pad_token_id)
        with STOP_SIGNALS.deferred():
            self.updating = True  # until the step is recorded: an error here leaves no checkpointable state
            stats, learn_s = self.roles.learn(batch)
            self.step_count += 1
            seconds = time.perf_counter() - started
            tokens = sum(len(self.train_rows[i].input_ids) for i in indices)
            metrics = {"step": self.step_count, "epoch": self.sampler.position(self.step_count - 1)[0], **stats,
                       "time/step": seconds, "time/learn": learn_s, "throughput/tokens_per_s": tokens / seconds,
                       "data/padding_fraction": 1.0 - tokens / batch.input_ids.numel()}
            if self.due(self.cfg.training.eval_every_steps):
                metrics.update(self._eval_metrics(self.evaluate()))
            self.metrics_log.log(metrics)
            self.updating = False
            if self.due(self.cfg.checkpoint.every_steps):
                self.save_checkpoint()
        return metrics

    @staticmethod
    def progress(metrics: dict) -> dict:
        return {"loss": f"{metrics['loss/sft']:.3f}", "tok_s": f"{metrics['throughput/tokens_per_s']:.0f}"}

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, dict]:
        """Per evaluation set: the mean loss over its assistant tokens and the perplexity, by the current policy."""
        tables = {}
        for name, rows in self.eval_sets.items():
            sums = evaluate_rows(self.roles, [len(r.input_ids) for r in rows],
                                 lambda indices, r=rows: sequence_batch(r, indices, self.tokenizer.pad_token_id),
                                 self.cfg.training.micro_batch_size)
            nll, tokens = float(sums[:, 0].sum()), float(sums[:, 1].sum())
            loss = nll / max(tokens, 1.0)
            tables[name] = {"conversations": len(rows), "tokens": int(tokens), "loss": loss,
                            "perplexity": math.exp(min(loss, 50.0))}
        return tables

    @staticmethod
    def _eval_metrics(tables: dict) -> dict[str, float]:
        return {f"eval/{name}/{key}": table[key] for name, table in tables.items() for key in ("loss", "perplexity")}

    # ----------------------------------------------------------------------------------- durability
    def restore(self, path) -> None:
        self.restore_learners(path)
        log.info("resumed from %s: %d of %d steps done", path, self.step_count, self.num_steps)

    def finish(self) -> str:
        """Checkpoint (checkpoint.at_end), final evaluation (eval.json), the policy (final_model)."""
        self.checkpoint_at_end()
        out = Path(self.cfg.output_dir).resolve()
        tables = self.evaluate()
        self.final_eval = tables
        (out / "eval.json").write_text(json.dumps({"step": self.step_count, "sets": tables}, indent=2))
        self.metrics_log.log({"step": self.step_count, **self._eval_metrics(tables)})
        return self.roles.save(str(out / "final_model"))

    def closing(self) -> list[str]:
        rows = [json.loads(line) for line in (Path(self.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss/sft" in r]
        lines = self.drawn_report() + [describe({name: t}) for name, t in self.final_eval.items()]
        if steps:
            seconds = sum(r["time/step"] for r in steps)
            lines.append(f"{len(steps)} steps in {seconds:.0f} s; loss {steps[0]['loss/sft']:.3f} → "
                         f"{steps[-1]['loss/sft']:.3f}")
        return lines


def describe(tables: dict) -> str:
    return ", ".join(f"{name} loss {t['loss']:.3f} (perplexity {t['perplexity']:.2f}) on {t['tokens']} assistant tokens"
                     for name, t in tables.items())
