"""The DPO driver (and its variants: rlhf_ray.algorithms.preference_math.DPO_LOSSES): a run of the learner over a dataset
(rlhf_ray.drivers.dataset) whose step first asks the reference role for the log-probs of the pairs it has not seen
before (once per pair for the whole run), then updates the policy (rlhf_ray.objectives.dpo). The reference is the
same role PPO uses, so a large one can be sharded (resources.reference.sharded). Its log-probs are kept per pair in
the driver, saved with every checkpoint: later epochs and a resumed run do not compute them again. With ``lora`` the
policy trains as adapters and the learner computes the reference log-probs itself, its adapters off.
<output_dir>/final_model is the policy; eval.json holds the implicit-reward preference accuracy per evaluation set,
overall and per source.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.algorithms.preference_math import dpo_needs_reference, get_dpo_loss
from rlhf_ray.cluster.roles import ModelPaths, Roles
from rlhf_ray.data.batch import ResponsePairBatch
from rlhf_ray.data.sources import PreferencePair, PromptSampler, preference_sets, render_messages
from rlhf_ray.drivers.base import evaluate_rows
from rlhf_ray.drivers.dataset import DatasetDriver
from rlhf_ray.drivers.reward_model import accuracy_table
from rlhf_ray.models.modeling import check_same_tokenizer
from rlhf_ray.models.specs import resolve_model
from rlhf_ray.objectives.dpo import TIE, DPOOptions, loss_options
from rlhf_ray.run import preflight

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class EncodedResponsePairs:
    """Token ids of each pair's prompt and of both responses, as the policy reads them."""
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    sources: list[str]
    truncated: int  # pairs whose prompt or a response was cut

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int], pad_token_id: int) -> ResponsePairBatch:
        return ResponsePairBatch.from_encoded([self.prompts[i] for i in indices], [self.chosen[i] for i in indices],
                                              [self.rejected[i] for i in indices], [self.sources[i] for i in indices],
                                              pad_token_id)

    def lengths(self) -> list[int]:
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompts, self.chosen, self.rejected)]


def encode_response_pairs(tokenizer, pairs: list[PreferencePair], template: str, max_prompt_length: int,
                          max_length: int) -> EncodedResponsePairs:
    """Each pair's prompt rendered up to the assistant's turn (its last ``max_prompt_length`` tokens kept) and each
    response as the template renders the assistant's turn after it, end-of-turn marker included (cut at its end to
    fit ``max_length``). The response's text is found by rendering: the whole conversation minus the rendered prompt."""
    out = EncodedResponsePairs([], [], [], [], 0)
    for pair in pairs:
        prompt_text = render_messages(pair.prompt, template, tokenizer, add_generation_prompt=True)
        responses = []
        for conversation in pair.conversations():
            whole = render_messages(conversation, template, tokenizer, add_generation_prompt=False)
            if not whole.startswith(prompt_text):
                raise ValueError(f"data.template={template!r}: the rendered prompt is not the start of the rendered "
                                 "conversation (the template rewrites earlier turns), so the response cannot be told "
                                 "apart; use template='tulu' or a template that appends turns")
            responses.append(tokenizer(whole[len(prompt_text):], add_special_tokens=False)["input_ids"])
        prompt = tokenizer(prompt_text, add_special_tokens=template == "tulu")["input_ids"]
        cut = len(prompt) > max_prompt_length or any(len(prompt[-max_prompt_length:]) + len(r) > max_length
                                                     for r in responses)
        prompt = prompt[-max_prompt_length:]
        room = max_length - len(prompt)
        out.prompts.append(prompt)
        out.chosen.append(responses[0][:room])
        out.rejected.append(responses[1][:room])
        out.sources.append(pair.source or "unknown")
        out.truncated += cut
    return out


class DPOTrainer(DatasetDriver):
    unit, exported = "DPO", "policy"  # for the console (rlhf_ray.run.harness.run)
    schedule, loss_key, eval_figures = "dpo", "loss/dpo", ("accuracy", "loss", "margin")
    reference_pairs_computed = 0  # over the run (this process): each pair's once

    # ------------------------------------------------------------------------------------ startup
    def resolve_models(self) -> None:
        cfg = self.cfg
        resolve = lambda spec: resolve_model(spec, cfg.cache_dir, cfg.seed)  # noqa: E731
        self.paths = ModelPaths(policy=resolve(cfg.model), reference=resolve(cfg.reference_path), reward=None,
                                value=None)
        preflight.check_model_path(cfg.model, self.paths.policy, "model")
        if self.needs_reference and self.paths.reference != self.paths.policy:
            preflight.check_model_path(cfg.reference_path, self.paths.reference, "reference")
            check_same_tokenizer(self.paths.policy, self.paths.reference, "the reference model (reference)")

    @property
    def needs_reference(self) -> bool:
        return dpo_needs_reference(self.cfg.dpo.loss)

    def load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, data = self.cfg, self.cfg.data
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths.policy)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        train, sets = preference_sets(data, cfg.seed)
        encode = lambda p: encode_response_pairs(self.tokenizer, p, data.template, data.max_prompt_length,  # noqa: E731
                                                 data.max_length)
        self.train_pairs, self.eval_sets = encode(train), {name: encode(p) for name, p in sets.items()}
        for name, encoded in [("train", self.train_pairs), *self.eval_sets.items()]:
            log.info("%s: %d pairs; %d cut to data.max_prompt_length=%d / data.max_length=%d", name, len(encoded),
                     encoded.truncated, data.max_prompt_length, data.max_length)
        self.sampler = PromptSampler(len(self.train_pairs), cfg.dpo.batch_size, cfg.seed, what="training pairs",
                                     key="dpo.batch_size")
        self.num_steps = cfg.dpo.epochs * self.sampler.batches_per_epoch
        # the reference's summed log-probs of (chosen, rejected) per pair of each set; NaN: not computed yet
        self.reference_logps = {name: torch.full((len(pairs), 2), float("nan"))
                                for name, pairs in [("train", self.train_pairs), *self.eval_sets.items()]}

    def start_roles(self) -> Roles:
        # with lora the learner's base, its adapters off, is the reference: no reference actors
        roles = ("learner", "reference") if self.needs_reference and self.cfg.lora is None else ("learner",)
        # the reference's log-probs and the policy's evaluation passes are never computed at the same time
        spec = self.learner_spec("dpo", self.paths.policy, options=DPOOptions(dpo=self.cfg.dpo), lora=self.cfg.lora)
        return Roles(self.cfg, self.paths, spec, roles=roles, solo_phases=("score",))

    def after_roles(self) -> None:
        self.say_lora(self.cfg.lora, reference=self.needs_reference)

    # ------------------------------------------------------------------------------------------ a step
    def batch(self, indices: list[int]) -> ResponsePairBatch:
        batch = self.train_pairs.batch(indices, self.tokenizer.pad_token_id)
        computed, start = self.reference_pairs_computed, time.perf_counter()
        if self.needs_reference:
            batch = batch.with_(ref_logps=self.reference_for("train", indices))
        self._reference_figures = {"time/reference": time.perf_counter() - start,
                                   "reference/pairs_computed": float(self.reference_pairs_computed - computed)}
        return batch

    def step_metrics(self, indices: list[int], batch: ResponsePairBatch, seconds: float) -> dict[str, float]:
        return {**self._reference_figures, "throughput/pairs_per_s": len(indices) / seconds}

    def reference_for(self, name: str, indices: list[int]) -> torch.Tensor:
        """[len(indices), 2] the reference's log-probs of these pairs of set ``name``: computed by the reference role
        (with lora: by the learner, its adapters off) for the pairs that have none yet, and kept. An evaluation set goes
        in calls of a training step's size: each call must end within timeouts.score_s (with lora: timeouts.learn_s),
        which a whole set on a CPU need not."""
        cache = self.reference_logps[name]
        missing = sorted({i for i in indices if torch.isnan(cache[i, 0])})
        pairs = self.train_pairs if name == "train" else self.eval_sets[name]
        ranks, size = len(self.roles.references or self.roles.learners), self.cfg.dpo.batch_size
        for start in range(0, len(missing), size):
            part = missing[start:start + size]
            padded = part + [part[-1]] * (-len(part) % ranks)  # equal shares (a sharded model's collectives)
            scored, _ = self.roles.score(pairs.batch(padded, self.tokenizer.pad_token_id).sides(), roles=("reference",))
            cache[part] = scored["ref_logprobs"].sum(-1).view(-1, 2)[:len(part)]
            self.reference_pairs_computed += len(part)
        return cache[indices]

    @staticmethod
    def progress(metrics: dict) -> dict:
        return {"loss": f"{metrics['loss/dpo']:.3f}", "acc": f"{metrics['dpo/accuracy']:.2f}",
                "margin": f"{metrics['dpo/rewards/margin']:.3f}"}

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, dict]:
        """Per evaluation set: the implicit rewards' preference accuracy (overall and per source; a tie counts half),
        the mean loss and margin, by the learners' current policy against the reference."""
        dpo = self.cfg.dpo
        variant = get_dpo_loss(dpo.loss)
        tables = {}
        for name, pairs in self.eval_sets.items():
            logps = evaluate_rows(self.roles, pairs.lengths(), lambda rows, p=pairs: p.batch(
                rows, self.tokenizer.pad_token_id), dpo.micro_batch_size)
            ref = self.reference_for(name, list(range(len(pairs)))) if self.needs_reference else None
            lengths = torch.tensor([[len(c), len(r)] for c, r in zip(pairs.chosen, pairs.rejected)],
                                   dtype=torch.float32)
            losses, reward_chosen, reward_rejected = variant(
                logps[:, 0], logps[:, 1], *((ref[:, 0], ref[:, 1]) if ref is not None else (None, None)),
                lengths[:, 0], lengths[:, 1], beta=dpo.beta, **loss_options(dpo))
            rewards = torch.stack([reward_chosen, reward_rejected], dim=-1)
            tables[name] = {**accuracy_table(rewards, pairs.sources, tie=TIE), "loss": float(losses.mean()),
                            "margin": float((reward_chosen - reward_rejected).mean())}
        return tables

    def describe_set(self, name: str, table: dict) -> str:
        return f"{name} accuracy {table['accuracy']:.3f} (margin {table['margin']:+.3f}) on {table['pairs']} pairs"

    # ----------------------------------------------------------------------------------- durability
    def save_driver_files(self, directory: Path) -> None:
        """The reference log-probs computed so far: a resumed run does not compute them again."""
        from safetensors.torch import save_file

        save_file({name: cache.contiguous() for name, cache in self.reference_logps.items()},
                  directory / REFERENCE_FILE)

    def restore_driver_files(self, directory: Path) -> None:
        from safetensors.torch import load_file

        saved = directory / REFERENCE_FILE
        if saved.is_file():
            for name, cache in load_file(saved).items():
                if name in self.reference_logps and cache.shape == self.reference_logps[name].shape:
                    known = ~torch.isnan(cache[:, 0])
                    self.reference_logps[name][known] = cache[known]
        log.info("reference log-probs of %d pairs kept from %s", sum(int((~torch.isnan(c[:, 0])).sum())
                                                                   for c in self.reference_logps.values()), directory)

    def closing_extra(self, steps: list[dict], seconds: float) -> str:
        return f"; reference log-probs of {self.reference_pairs_computed} pairs computed (once each)"
