"""The SFT driver: a run of the learner over a dataset (rlhf_ray.drivers.dataset) whose objective is the loss on
assistant tokens (rlhf_ray.objectives.sft). Conversations are encoded with a loss mask found by
rendering (rlhf_ray.data.conversations); with data.packing several go in a row, each attending only to itself.
<output_dir>/final_model is the fine-tuned policy; eval.json holds the loss and perplexity on assistant tokens per
evaluation set.
"""
from __future__ import annotations

import logging
import math
import random

from rlhf_ray.cluster.roles import Roles
from rlhf_ray.data.batch import SequenceBatch
from rlhf_ray.data.conversations import EncodedConversation, PackedRow, load_sft_conversations, pack
from rlhf_ray.data.sources import PromptSampler, dataset_names
from rlhf_ray.drivers.base import evaluate_rows
from rlhf_ray.drivers.dataset import DatasetDriver
from rlhf_ray.objectives.sft import SFTOptions

log = logging.getLogger(__name__)


def as_rows(conversations: list[EncodedConversation]) -> list[PackedRow]:
    """One conversation per row (no packing)."""
    return [PackedRow(c.input_ids, c.loss_mask, list(range(len(c.input_ids))), [len(c.input_ids)])
            for c in conversations]


def sequence_batch(rows: list[PackedRow], indices: list[int], pad_token_id: int) -> SequenceBatch:
    return SequenceBatch.from_rows([(rows[i].input_ids, rows[i].loss_mask, rows[i].sequence_lengths) for i in indices],
                                   pad_token_id)


class SFTTrainer(DatasetDriver):
    unit, exported = "SFT", "policy"  # for the console (rlhf_ray.run.harness.run)
    loss_key, eval_figures = "loss/sft", ("loss", "perplexity")

    # ------------------------------------------------------------------------------------ startup
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
                 ", ".join(f"{name}: {len(rows)} conversations" for name, rows in self.eval_sets.items())
                 or "no eval sets")
        self.sampler = PromptSampler(len(self.train_rows), cfg.training.batch_size, cfg.seed, what="training rows",
                                     key="training.batch_size")
        self.num_steps = cfg.training.epochs * self.sampler.batches_per_epoch

    def start_roles(self) -> Roles:
        learner = self.learner_spec("sft", self.model_path, options=SFTOptions(loss_mean=self.cfg.training.loss_mean),
                                    lora=self.cfg.lora)
        return Roles(self.cfg, None, learner, roles=("learner",))

    def after_roles(self) -> None:
        self.say_lora(self.cfg.lora)

    # ------------------------------------------------------------------------------------------ a step
    def batch(self, indices: list[int]) -> SequenceBatch:
        return sequence_batch(self.train_rows, indices, self.tokenizer.pad_token_id)

    def step_metrics(self, indices: list[int], batch: SequenceBatch, seconds: float) -> dict[str, float]:
        tokens = sum(len(self.train_rows[i].input_ids) for i in indices)
        return {"throughput/tokens_per_s": tokens / seconds,
                "data/padding_fraction": 1.0 - tokens / batch.input_ids.numel()}

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

    def describe_set(self, name: str, table: dict) -> str:
        return (f"{name} loss {table['loss']:.3f} (perplexity {table['perplexity']:.2f}) on {table['tokens']} assistant "
                "tokens")
