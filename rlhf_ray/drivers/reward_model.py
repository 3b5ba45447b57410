"""The reward-model training driver (Bradley–Terry): a run of the learner over a dataset (rlhf_ray.drivers.dataset:
one step is the pairs of step s, an update, metrics, evaluation and checkpoint when due).

The learner group is the same generic learner PPO uses, running the ``bradley_terry`` objective
(rlhf_ray.objectives). The result, <output_dir>/final_model, is an HF sequence-classification model
(safetensors) with its tokenizer and reward_stats.json (score mean/std for the reward backends'
``normalize: stored``); eval.json holds pairwise accuracy per evaluation set, overall and per source.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhf_ray.algorithms.preference_math import pairwise_accuracy
from rlhf_ray.cluster.roles import Roles
from rlhf_ray.data.batch import PairBatch
from rlhf_ray.data.sources import PreferencePair, PromptSampler, preference_sets
from rlhf_ray.drivers.base import evaluate_rows
from rlhf_ray.drivers.dataset import DatasetDriver
from rlhf_ray.models.modeling import encode_conversations, load_reward_tokenizer
from rlhf_ray.rewards.base import write_reward_stats

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
    """Pairwise accuracy overall and per source (``tie``: rlhf_ray.algorithms.preference_math.pairwise_accuracy). scores: [N, 2]
    (chosen, rejected)."""
    per_source = {}
    for source in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == source]
        per_source[source] = {"pairs": len(rows),
                              "accuracy": pairwise_accuracy(scores[rows, 0], scores[rows, 1], tie)}
    return {"pairs": len(sources), "accuracy": pairwise_accuracy(scores[:, 0], scores[:, 1], tie),
            "per_source": per_source}


class RewardModelTrainer(DatasetDriver):
    unit, exported = "RM", "reward model"  # for the console (rlhf_ray.run.harness.run)
    loss_key, eval_figures = "loss/bradley_terry", ("accuracy",)

    def load_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_reward_tokenizer(self.model_path)
        self.train_pairs, self.eval_sets = self._load_data()
        self.sampler = PromptSampler(len(self.train_pairs), cfg.training.batch_size, cfg.seed, what="training pairs",
                                     key="training.batch_size")
        self.num_steps = cfg.training.epochs * self.sampler.batches_per_epoch

    def start_roles(self) -> Roles:
        return Roles(self.cfg, None, self.learner_spec("bradley_terry", self.model_path), roles=("learner",))

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

    # ------------------------------------------------------------------------------------------ a step
    def batch(self, indices: list[int]) -> PairBatch:
        return self.train_pairs.batch(indices, self.tokenizer.pad_token_id)

    def step_metrics(self, indices: list[int], batch: PairBatch, seconds: float) -> dict[str, float]:
        return {"throughput/pairs_per_s": len(indices) / seconds,
                "throughput/tokens_per_s": self.train_pairs.tokens(indices) / seconds}

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
        """Accuracy tables of every evaluation set, with the scores (``_scores``: for the normalisation statistics,
        not in eval.json)."""
        return {name: {**accuracy_table(scores := self.scores(pairs), pairs.sources), "_scores": scores}
                for name, pairs in self.eval_sets.items()}

    def describe_set(self, name: str, table: dict) -> str:
        sources = table["per_source"]
        return f"{name}: accuracy {table['accuracy']:.3f} on {table['pairs']} pairs" + (
            " (" + ", ".join(f"{s} {r['accuracy']:.3f}/{r['pairs']}" for s, r in sources.items()) + ")"
            if len(sources) > 1 else "")

    # ----------------------------------------------------------------------------------- durability
    def after_final(self, final: str, tables: dict) -> None:
        """The RM's score statistics beside it (reward_stats.json)."""
        write_reward_stats(final, *self._scores_for_statistics(tables))

    def _scores_for_statistics(self, tables: dict) -> tuple[torch.Tensor, str]:
        """The RM's scores over the responses of the held-out pairs (else the first evaluation set, else up to
        256 training pairs) and what they are: what ``normalize: stored`` shifts and scales by."""
        name = "heldout" if "heldout" in tables else next(iter(tables), None)
        if name:
            return tables[name]["_scores"], f"{name}: {2 * len(tables[name]['_scores'])} responses"
        sample = EncodedPairs(*(x[:256] for x in (self.train_pairs.chosen, self.train_pairs.rejected,
                                                  self.train_pairs.margins, self.train_pairs.sources)), 0)
        return self.scores(sample), f"train: {2 * len(sample)} responses"

    def closing_extra(self, steps: list[dict], seconds: float) -> str:
        pairs = sum(r["throughput/pairs_per_s"] * r["time/step"] for r in steps)
        return f"; {pairs / seconds:.2f} pairs/s"
