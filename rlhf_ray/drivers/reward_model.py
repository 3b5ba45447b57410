"""The reward-model training driver (Bradley–Terry). One step:

    pairs of step s (a pure function of seed and s) → learner update → metrics → evaluation / checkpoint when due

The learner group is the same generic learner PPO uses, running the ``bradley_terry`` objective
(rlhf_ray.objectives). The result, <output_dir>/final_model, is an HF sequence-classification model
(safetensors) with its tokenizer and reward_stats.json (score mean/std for the reward backends'
``normalize: stored``); eval.json holds pairwise accuracy per evaluation set, overall and per source.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray import preflight
from rlhf_ray.batch import PairBatch
from rlhf_ray.config import RewardTrainingConfig
from rlhf_ray.data import PreferencePair, PromptSampler, preference_sets
from rlhf_ray.drivers.base import CheckpointedDriver, evaluate_rows
from rlhf_ray.models.specs import resolve_model
from rlhf_ray.models.modeling import encode_conversations, load_reward_tokenizer
from rlhf_ray.objectives import LearnerSpec
from rlhf_ray.preference_math import pairwise_accuracy
from rlhf_ray.rewards.base import write_reward_stats
from rlhf_ray.cluster.roles import ActorLost, Roles
from rlhf_ray.cluster.signals import STOP_SIGNALS

log = logging.getLogger(__name__)


@dataclass
class EncodedPairs:
    """Token ids of both sides of each pair, as the RM reads them (rlhf_ray.models.modeling.encode_conversations)."""
    chosen: list[list[int]]
    rejected: list[list[int]]
    margins: list[float]
    sources: list[str]
    truncated: int  # conversations cut to max_length (their start dropped)

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, indices: list[int], pad_token_id: int) -> PairBatch:
        return PairBatch.from_encoded([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                                      [self.margins[i] for i in indices], [self.sources[i] for i in indices],
                                      pad_token_id)

    def tokens(self, indices: list[int]) -> int:
        return sum(len(self.chosen[i]) + len(self.rejected[i]) for i in indices)


def encode_pairs(tokenizer, pairs: list[PreferencePair], template: str, max_length: int,
                 chunk: int = 256) -> EncodedPairs:
    ids: list[list[int]] = []
    conversations = [c for pair in pairs for c in pair.conversations()]  # chosen, rejected, chosen, …
    for start in range(0, len(conversations), chunk):
        enc = encode_conversations(tokenizer, conversations[start:start + chunk], template, max_length)
        ids += [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return EncodedPairs(chosen=ids[0::2], rejected=ids[1::2], margins=[p.margin for p in pairs],
                        sources=[p.source or "unknown" for p in pairs],
                        truncated=sum(len(x) >= max_length for x in ids))  # reached the cap (almost always: cut)


def accuracy_table(scores: torch.Tensor, sources: list[str], tie: float | None = None) -> dict:
    """Pairwise accuracy overall and per source (``tie``: rlhf_ray.preference_math.pairwise_accuracy). scores: [N, 2]
    (chosen, rejected)."""
    per_source = {}
    for source in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == source]
        per_source[source] = {"pairs": len(rows),
                              "accuracy": pairwise_accuracy(scores[rows, 0], scores[rows, 1], tie)}
    return {"pairs": len(sources), "accuracy": pairwise_accuracy(scores[:, 0], scores[:, 1], tie),
            "per_source": per_source}


class RewardModelTrainer(CheckpointedDriver):
    unit, exported = "RM", "reward model"  # for the console (rlhf_ray.train.run)

    def __init__(self, cfg: RewardTrainingConfig):
        self.cfg = cfg
        self.start_up()  # rlhf_ray.drivers.base: the steps below, in the order every driver starts in
        self.final_eval: dict = {}
        if cfg.training.eval_at_start and self.step_count == 0 and self.eval_sets:
            tables = self.evaluate()
            self.metrics_log.log({"step": 0, **self._eval_metrics(tables)})
            log.info("before training: %s", ", ".join(f"{name} accuracy {t['accuracy']:.3f}" for name, t in tables.items()))

    def resolve_models(self) -> None:
        cfg = self.cfg
        self.model_path = resolve_model(cfg.model, cfg.cache_dir, cfg.seed)
        preflight.check_model_path(cfg.model, self.model_path, "model")

    def load_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_reward_tokenizer(self.model_path)
        self.train_pairs, self.eval_sets = self._load_data()
        self.sampler = PromptSampler(len(self.train_pairs), cfg.training.batch_size, cfg.seed, what="training pairs",
                                     key="training.batch_size")
        self.num_steps = cfg.training.epochs * self.sampler.batches_per_epoch

    def start_roles(self) -> Roles:
        return Roles(self.cfg, None, self._learner(), roles=("learner",))

    def _load_data(self) -> tuple[EncodedPairs, dict[str, EncodedPairs]]:
        data = self.cfg.data
        train, sets = preference_sets(data, self.cfg.seed, data.margin_field)
        encode = lambda p: encode_pairs(self.tokenizer, p, data.template, data.max_length)  # noqa: E731
        train_pairs, eval_sets = encode(train), {name: encode(p) for name, p in sets.items()}
        for name, encoded in [("train", train_pairs), *eval_sets.items()]:
            log.info("%s: %d pairs; %d of %d conversations cut to data.max_length=%d", name, len(encoded),
                     encoded.truncated, 2 * len(encoded), data.max_length)
        if len(train_pairs) % self.cfg.training.batch_size:
            log.info("each epoch uses %d of the %d training pairs (whole batches of training.batch_size=%d; the order "
                     "changes every epoch)", len(train_pairs) // self.cfg.training.batch_size
                     * self.cfg.training.batch_size, len(train_pairs), self.cfg.training.batch_size)
        return train_pairs, eval_sets

    def _learner(self) -> LearnerSpec:
        cfg, learner = self.cfg, self.cfg.resources.learner
        return LearnerSpec(objective="bradley_terry", model=self.model_path, world_size=learner.num_actors,
                           num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                           mini_batch_size=cfg.training.batch_size, micro_batch_size=cfg.training.micro_batch_size,
                           epochs=1, optimizer_steps=self.num_steps, optimizer=cfg.optimizer, deepspeed=cfg.deepspeed,
                           timeout_s=cfg.timeouts.learn_s, seed=cfg.seed, export_dtype=cfg.dtype,
                           pad_token_id=self.tokenizer.pad_token_id)

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
        batch = self.train_pairs.batch(indices, self.tokenizer.pad_token_id)
        with STOP_SIGNALS.deferred():
            self.updating = True  # until the step is recorded: an error here leaves no checkpointable state
            stats, learn_s = self.roles.learn(batch)
            self.step_count += 1
            seconds = time.perf_counter() - started
            metrics = {"step": self.step_count, "epoch": self.sampler.position(self.step_count - 1)[0], **stats,
                       "time/step": seconds, "time/learn": learn_s, "throughput/pairs_per_s": len(indices) / seconds,
                       "throughput/tokens_per_s": self.train_pairs.tokens(indices) / seconds}
            if self.due(self.cfg.training.eval_every_steps):
                metrics.update(self._eval_metrics(self.evaluate()))
            self.metrics_log.log(metrics)
            self.updating = False
            if self.due(self.cfg.checkpoint.every_steps):
                self.save_checkpoint()
        return metrics

    @staticmethod
    def progress(metrics: dict) -> dict:
        return {"loss": f"{metrics['loss/bradley_terry']:.3f}", "acc": f"{metrics['rm/accuracy']:.2f}",
                "pairs_s": f"{metrics['throughput/pairs_per_s']:.1f}"}

    # ------------------------------------------------------------------------------------ evaluation
    def scores(self, pairs: EncodedPairs) -> torch.Tensor:
        """[N, 2] scores (chosen, rejected) of every pair, by the learners' current RM."""
        lengths = [max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected)]
        return evaluate_rows(self.roles, lengths, lambda rows: pairs.batch(rows, self.tokenizer.pad_token_id),
                             self.cfg.training.micro_batch_size)

    def evaluate(self) -> dict[str, dict]:
        """Accuracy tables of every evaluation set, with the scores (for normalisation statistics)."""
        return {name: {**accuracy_table(scores := self.scores(pairs), pairs.sources), "scores": scores}
                for name, pairs in self.eval_sets.items()}

    @staticmethod
    def _eval_metrics(tables: dict) -> dict[str, float]:
        metrics = {}
        for name, table in tables.items():
            metrics[f"eval/{name}/accuracy"] = table["accuracy"]
            metrics.update({f"eval/{name}/accuracy/{source}": row["accuracy"]
                            for source, row in table["per_source"].items()})
        return metrics

    # ----------------------------------------------------------------------------------- durability
    def restore(self, path) -> None:
        self.restore_learners(path)
        log.info("resumed from %s: %d of %d steps done", path, self.step_count, self.num_steps)

    def finish(self) -> str:
        """Checkpoint (checkpoint.at_end), final evaluation (eval.json), the RM with its statistics (final_model)."""
        self.checkpoint_at_end()
        out = Path(self.cfg.output_dir).resolve()
        tables = self.evaluate()
        self.final_eval = {name: {k: v for k, v in t.items() if k != "scores"} for name, t in tables.items()}
        (out / "eval.json").write_text(json.dumps({"step": self.step_count, "sets": self.final_eval}, indent=2))
        self.metrics_log.log({"step": self.step_count, **self._eval_metrics(tables)})
        final = self.roles.save(str(out / "final_model"))
        write_reward_stats(final, *self._scores_for_statistics(tables))
        return final

    def _scores_for_statistics(self, tables: dict) -> tuple[torch.Tensor, str]:
        """The RM's scores over the responses of the held-out pairs (else the first evaluation set, else up to
        256 training pairs) and what they are: what ``normalize: stored`` shifts and scales by."""
        name = "heldout" if "heldout" in tables else next(iter(tables), None)
        if name:
            return tables[name]["scores"], f"{name}: {2 * len(tables[name]['scores'])} responses"
        sample = EncodedPairs(*(x[:256] for x in (self.train_pairs.chosen, self.train_pairs.rejected,
                                                  self.train_pairs.margins, self.train_pairs.sources)), 0)
        return self.scores(sample), f"train: {2 * len(sample)} responses"

    def closing(self) -> list[str]:
        rows = [json.loads(line) for line in (Path(self.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "throughput/pairs_per_s" in r]
        lines = self.drawn_report() + [f"{name}: accuracy {t['accuracy']:.3f} on {t['pairs']} pairs" + (
                 " (" + ", ".join(f"{s} {r['accuracy']:.3f}/{r['pairs']}" for s, r in t["per_source"].items()) + ")"
                 if len(t["per_source"]) > 1 else "") for name, t in self.final_eval.items()]
        if steps:
            seconds = sum(r["time/step"] for r in steps)
            lines.append(f"{len(steps)} steps in {seconds:.0f} s, {sum(r['throughput/pairs_per_s'] * r['time/step'] for r in steps) / seconds:.2f} "
                         f"pairs/s; loss {steps[0]['loss/bradley_terry']:.3f} → {steps[-1]['loss/bradley_terry']:.3f}")
        return lines
