"""The PPO driver. One step, in order:

    prompts → generate → score (reward ‖ reference ‖ values, concurrently) → advantages → learn
            → weight sync → metrics → checkpoint (every checkpoint.every_steps)

With a critic-free estimator (ppo.advantage: grpo, rloo, …) there are no values: the learner joins the scoring only
for old logprobs, when the sampler's cannot serve. With ppo.dynamic_sampling, generate → reward repeats on more
prompts until every kept group of samples differs in score; reference and learner score the kept batch.

With ``ppo.async_steps: k`` (k ≥ 1) the rollouts of the next k steps (generate → reward ‖ reference) are made in
the background while this step's values and update run, each by the weights published k updates before the step it
is for; the engines load each published update between two rollouts (rlhf_ray.drivers.prefetch) — or, broadcast
(weights.transport=collective), take it at the publish, once the rollouts ahead have ended:

    rollouts t+1 … t+k (θ_t+1−k … θ_t) ·········································→
    wait for rollout t → values t → advantages → learn t (θ_t → θ_t+1) → publish θ_t+1 → metrics

Only this file knows the order of a step; the roles (rlhf_ray.cluster.roles) know how to split work over their
actors and replace a lost generation, reward or reference actor; the math lives in rlhf_ray.algorithms.ppo_math.
A lost learner rank takes the learner group back to the last checkpoint (rlhf_ray.drivers.base).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from rlhf_ray.cluster.connection import local_ray_down
from rlhf_ray.cluster.roles import ROLE_ORDER, ModelPaths, Roles
from rlhf_ray.config import ExperimentConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.sources import PromptSampler, load_prompts
from rlhf_ray.drivers.base import CheckpointedDriver
from rlhf_ray.drivers.prefetch import RolloutQueue, load_rollouts, save_rollouts
from rlhf_ray.drivers.rollout import (Rollout, RolloutCancelled, group_ids, phase, pick_samples, refill_prompts,
                                      sampler_gap, sampling_seeds, step_timing, with_advantages)
from rlhf_ray.models.modeling import check_same_tokenizer
from rlhf_ray.models.specs import resolve_model
from rlhf_ray.objectives import LearnerSpec
from rlhf_ray.objectives.ppo import PPOOptions
from rlhf_ray.rewards.composite import model_components, other_models
from rlhf_ray.rewards.normalize import ScoreNormalizer
from rlhf_ray.rewards.outage import OutageWatch
from rlhf_ray.rewards.stats import RewardStats
from rlhf_ray.run import preflight
from rlhf_ray.runtime.memory import process_memory
from rlhf_ray.runtime.signals import STOP_SIGNALS
from rlhf_ray.weights.sync import EnginesBehind

log = logging.getLogger(__name__)


class PPOTrainer(CheckpointedDriver):
    unit, exported = "PPO", "policy"  # for the console (rlhf_ray.run.harness.run)
    reward_pinned_by = None  # the checkpoint whose Serve RM version a resumed run took (adopt_saved)

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.start_up()  # rlhf_ray.drivers.base: the steps below, in the order every driver starts in

    def resolve_models(self) -> None:
        cfg, models = self.cfg, self.cfg.models
        resolve = lambda spec: resolve_model(spec, models.cache_dir, cfg.seed)  # noqa: E731
        reward = resolve(models.reward.model) if models.reward.loads_model else None  # an RM or a judge
        reference = resolve(models.reference_path) if cfg.reference_source()[0] != "none" else None
        self.paths = ModelPaths(policy=resolve(models.policy), reference=reference, reward=reward,
                                value=resolve(models.value_model_path)
                                if models.value_init == "reward" and cfg.ppo.needs_critic else None,
                                reward_components={spec: resolve(spec) for spec in other_models(models.reward)})
        preflight.check_experiment(cfg, {"models.policy": self.paths.policy, "models.reference": self.paths.reference,
                                         "models.reward.model": self.paths.reward,
                                         "models.value_model": self.paths.value}, self.paths.reward_components)
        if self.paths.value:
            check_same_tokenizer(self.paths.policy, self.paths.value, "the value model's source (models.value_init=reward)")
        if self.paths.reference not in (None, self.paths.policy):
            check_same_tokenizer(self.paths.policy, self.paths.reference, "the reference model (models.reference)")

    def load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths.policy)
        self.dataset = load_prompts(cfg.data, self.tokenizer, cfg.models.reward.route_fields())
        self.sampler = PromptSampler(len(self.dataset), cfg.ppo.rollout_batch_size, cfg.seed, cfg.data.shuffle)

    def before_cluster(self) -> None:
        cfg = self.cfg
        first = self.dataset.prompts[0]  # the RM's template, or the judge's judging prompt, with the data's first one
        if self.paths.reward:
            preflight.check_reward_template(cfg.models.reward, self.paths.reward, first.messages, first.label)
        for component in model_components(cfg.models.reward):
            preflight.check_reward_template(component, self.paths.reward_components[component.model],
                                            first.messages, first.label)
        if cfg.deepspeed.zero_stage > 0 and cfg.resources.learner.num_actors == 1:
            log.warning("deepspeed.zero_stage=%d with one learner rank partitions nothing but keeps extra fp32 "
                        "copies of the weights and gradients (SmolLM2-135M: peak 7.5 GB and 1.4x slower than with "
                        "0); set deepspeed.zero_stage=0 unless you are testing ZeRO", cfg.deepspeed.zero_stage)
        if cfg.logging.plan:
            from rlhf_ray.planning.planner import plan_at_startup

            plan_at_startup(cfg)

    def adopt_saved(self, saved: dict, path) -> None:
        from rlhf_ray.rewards.serve import adopt_pinned_app

        self.reward_pinned_by = path if adopt_pinned_app(self.cfg.models.reward, saved) else None

    def start_roles(self) -> Roles:
        if self.cfg.models.reward.kind == "serve":  # NAME@latest -> NAME@vN, once, before any reward actor starts
            from rlhf_ray.rewards.serve import pin_reward_app

            self.reward_app = pin_reward_app(self.cfg.models.reward, self.reward_pinned_by)
        # reference actors only where they compute the reference: not under LoRA (the learner's own base, adapters
        # off, is the reference), nor where there is none (ppo.kl_coef=0, ppo.reference=auto)
        roles = tuple(r for r in ROLE_ORDER if r != "reference" or self.cfg.reference_actors)
        return Roles(self.cfg, self.paths, ppo_learner(self.cfg, self.paths), roles=roles,
                     overlapped=self.cfg.ppo.async_steps > 0)

    def after_roles(self) -> None:
        cfg = self.cfg
        # an HTTP RM's outage is ridden out inside the reward actors; the console hears of it from here
        kinds = {cfg.models.reward.kind, *(c.kind for c in cfg.models.reward.components)}  # a composite's too
        self.outage_watch = OutageWatch.for_this_job().start() if "http" in kinds else None
        self.normalizer = self._score_normalizer()
        self.old_logprobs, why = cfg.old_logprobs_source()
        log.info("old logprobs for the PPO ratio: %s (%s)", self.old_logprobs, why)
        self.is_correction, why = cfg.is_correction()
        log.info("off-policy correction of the policy loss: %s (%s)", self.is_correction, why)
        log.info("advantages: %s — the learner trains %s (%.1f M parameters)%s", cfg.ppo.advantage,
                 "the policy and its critic" if cfg.ppo.needs_critic else "the policy alone, no critic",
                 self.roles.learner_parameters() / 1e6, "" if cfg.ppo.needs_critic else ", and runs no values pass")
        # LoRA (models.lora): the learner's base with the adapters off is the reference; overlapped, it runs beside
        # the values pass (the learner is busy with the update while the next rollout is sampled)
        reference, why = cfg.reference_source()
        self.has_reference, self.reference_in_learner = reference != "none", reference == "learner"
        if self.reference_in_learner:
            log.info("models.lora: the policy trains as rank-%d adapters; the reference is its base with the adapters "
                     "off, computed in the learner (no reference actors)", cfg.models.lora.rank)
        if not self.has_reference:
            log.info("%s: no reference actors, no KL metrics; ppo.reference=keep keeps one to monitor the KL", why)
            if cfg.models.reference:
                log.warning("models.reference=%s is unused: %s; set ppo.reference=keep to monitor the KL to it",
                            cfg.models.reference, why)
        elif cfg.ppo.kl_coef == 0:
            log.info("reference kept at ppo.kl_coef=0 (%s)", why)
        self.engine_version = 0  # the learner update whose weights the engines hold (overlapped: the rollout thread's)
        self.resample_from = None  # overlapped broadcast: the first rollout ahead to sample again (_publish)
        self.published = (0, None)  # overlapped: the latest update published (engines load it later) and its payload
        self.in_hand: Rollout | None = None       # the rollout of the step under way, until the step is recorded
        # ppo.async_steps=k: the rollouts of the next k steps, made in the background (rlhf_ray.drivers.prefetch)
        self.queue = RolloutQueue(cfg.ppo.async_steps, self._sample_ahead) if cfg.ppo.async_steps else None

    @property
    def learner_scores(self) -> bool:
        """Whether the learner has a pass before its update: values (a critic) or old logprobs (not the sampler's)."""
        return self.cfg.ppo.needs_critic or self.old_logprobs == "learner"

    @property
    def num_steps(self) -> int:
        return self.cfg.num_steps

    @staticmethod
    def progress(metrics: dict) -> dict:
        """The progress bar's figures after a step."""
        kl = {"kl": f"{metrics['kl/mean']:.3f}"} if "kl/mean" in metrics else {}  # (none without a reference)
        return {"reward": f"{metrics['reward/mean']:.3f}", **kl, "step_s": f"{metrics['time/step']:.1f}"}

    def closing(self) -> list[str]:
        """The report picture (logging.report) and the one-line summary of the run, for the console."""
        from rlhf_ray.run.report import draw, load_metrics, summary

        out = Path(self.cfg.output_dir)
        rows = load_metrics(out)
        lines = [f"report: {draw({out.resolve().name: rows}, out / 'report.png')}"] if self.cfg.logging.report else []
        return lines + [summary(rows)]

    # ------------------------------------------------------------------------------------------ a step
    def _step(self) -> dict[str, float]:
        """One PPO step, recorded (metrics.jsonl, samples.jsonl, TensorBoard); a lost learner: ``step`` (drivers.base).

        A stop signal during generation or scoring ends the step at once (nothing has changed yet); from the update
        on, it waits until the step is recorded (rlhf_ray.runtime.signals).
        """
        step, normalizer_state = self.step_count, self.normalizer.state_dict()
        try:
            return self._run_step()
        finally:
            if self.step_count == step:  # not recorded: the running score statistics must not count its scores
                self.normalizer.load_state_dict(normalizer_state)

    def _run_step(self) -> dict[str, float]:
        started = time.perf_counter()
        overlapped = self.queue is not None
        rollout, waited, inline = self._take_rollout()
        self.in_hand = rollout
        times, role_seconds, batch = {**rollout.times, "rollout_wait": waited}, dict(rollout.seconds), rollout.batch
        if overlapped:
            self.queue.fill(self.step_count, self.num_steps, self.published)  # the next k steps' rollouts under way
            roles = (("learner",) if self.learner_scores else ()) + (("reference",) if self.reference_in_learner else ())
            if roles:
                with phase(times, "values"):  # the learner's own pass: its weights are newer than the sampler's
                    scored, seconds = self.roles.score(batch, roles=roles)
                batch, role_seconds = batch.with_(**scored), {**role_seconds, **seconds}
            if not self.learner_scores:
                batch = batch.with_(old_logprobs=batch.gen_logprobs)
        elif self.old_logprobs == "sampler":
            batch = batch.with_(old_logprobs=batch.gen_logprobs)
        raw_scores = batch.scores
        batch, rollout_stats = with_advantages(batch.with_(scores=self.normalizer(raw_scores)),  # normalize / clip
                                               self.cfg.ppo, self.is_correction, self.cfg.generation.max_new_tokens)
        rollout_stats.update(rollout.stats)
        rollout_stats["async/staleness"] = float(self.step_count - rollout.policy_version)
        if self.normalizer.mode != "none" or self.normalizer.clip is not None:
            rollout_stats.update({"score/raw_mean": float(raw_scores.mean()),
                                  "score/raw_std": float(raw_scores.std(unbiased=False))})
        with STOP_SIGNALS.deferred():
            self.updating = True  # until the step is recorded: an error here leaves no checkpointable state
            with phase(times, "learn"):
                learn_stats, learn_s = self.roles.learn(batch)
            rollout_stats["kl/sampler_vs_learner"] = sampler_gap(batch, learn_stats, self.old_logprobs)
            with phase(times, "weight_sync"):  # overlapped: published only; the rollout thread has the engines load it
                if overlapped:
                    payload, publish_s = self._publish()
                    # the load of the weights that sampled it
                    sync = {"publish": publish_s, "load": rollout.load_s, "report": rollout.load_report}
                else:
                    sync = self.roles.sync_weights()
            self.step_count += 1
            self.in_hand = None
            if overlapped:
                self.published = (self.step_count, payload)
                if self.roles.weights.engines_take_part:  # broadcast: the engines hold it already
                    self.engine_version = self.step_count
                    if self.resample_from is not None:
                        self.queue.resample_from(self.resample_from, self.step_count)
            else:
                self.engine_version = self.step_count
            memory = {**self.roles.memory(), "memory/driver_peak_gb": process_memory(reset_peak=True)["peak_gb"]}
            times["step"] = time.perf_counter() - started
            metrics = {"step": self.step_count, **rollout_stats, **learn_stats, **memory, **self._recovery_stats(),
                       **step_timing(times, role_seconds, rollout.generate_s, learn_s, sync, batch,
                                      overlapped and not inline)}
            self.record(metrics)
            self.metrics_log.log_samples(pick_samples(batch, self.cfg.logging.samples_per_step, self.step_count))
            self.updating = False
            if self.due(self.cfg.checkpoint.every_steps):
                self.save_checkpoint()
        return metrics

    def _publish(self) -> tuple[object, float]:
        """Overlapped: the learner's new weights published for the rollouts ahead; returns the payload and seconds.
        A broadcast (weights.transport=collective) reaches every engine at once, so the rollouts ahead, sampled by the
        weights the engines hold, end first; those from one whose engine was replaced on the way are sampled again
        by these weights (``resample_from``: rlhf_ray.weights.sync.EnginesBehind)."""
        self.resample_from = self.queue.settle() if self.roles.weights.engines_take_part else None
        return self.roles.publish_weights()

    # ------------------------------------------------------------------------------------ rollouts
    def _sample_ahead(self, step: int, version: int, payload, cancel: threading.Event) -> Rollout:
        """The rollout thread's work (rlhf_ray.drivers.prefetch.RolloutQueue): rollout ``step`` sampled by the weights
        of update ``version``, which the engines load first (``payload``, published) where they hold older ones."""
        loaded = {"load": 0.0, "report": {}}
        if version != self.engine_version:
            loaded = self.roles.load_weights(payload)
            self.engine_version = version
        if cancel.is_set():
            raise RolloutCancelled()
        rollout = self._rollout(step, cancel)
        rollout.load_s, rollout.load_report = loaded["load"], loaded["report"] or {}
        return rollout

    def _rollout(self, step: int, cancel: threading.Event | None = None) -> "Rollout":
        """Step ``step``'s prompts sampled by the engines' current weights and scored: by reward and reference,
        and — when nothing overlaps — by the learner (values, and old logprobs unless the sampler's serve), all at
        once. With ppo.dynamic_sampling the reward scores first and groups of equal scores are replaced
        (``_informative_groups``). A prefetch stops after generating once ``cancel`` is set."""
        times, version, stats = {}, self.engine_version, {}
        prompts = [self.dataset.prompts[i] for i in self.sampler.batch(step)]
        with phase(times, "generate"):
            batch, generate_s = self.roles.generate(prompts, sampling_seeds(self.cfg.seed, step, len(prompts)))
        batch = batch.with_(group_ids=group_ids(len(prompts), self.cfg.generation.n_samples_per_prompt))
        if cancel is not None and cancel.is_set():
            raise RolloutCancelled()
        # overlapped, the learner scores later with its newer weights (_run_step)
        overlapped = self.queue is not None
        reference = self.has_reference and not (overlapped and self.reference_in_learner)
        roles = ("reward",) + (("reference",) if reference else ())
        roles += ("learner",) if self.learner_scores and not overlapped else ()
        seconds = {}
        if self.cfg.ppo.dynamic_sampling:
            batch, seconds, stats, extra_generate_s = self._informative_groups(step, batch, times, cancel)
            generate_s += extra_generate_s
            roles = tuple(r for r in roles if r != "reward")
        with phase(times, "score_wall"):
            scored, more = self.roles.score(batch, roles=roles, old_logprobs=self.old_logprobs == "learner")
        seconds = {role: seconds.get(role, 0.0) + more.get(role, 0.0) for role in {*seconds, *more}}
        reward_stats = stats.pop("reward_stats", None) or scored.pop("reward_stats", None) or RewardStats()
        stats.update(reward_stats.metrics())  # reward/<component>/raw_mean, reward/cache_hit_rate, …
        return Rollout(step, batch.with_(**scored), times, seconds, generate_s, version, stats)

    def _informative_groups(self, step: int, batch: RolloutBatch, times: dict, cancel: threading.Event | None):
        """ppo.dynamic_sampling: score ``batch`` by the reward, drop the groups (one prompt's samples) whose scores are
        all equal — their grouped advantages are 0 — and sample groups of further prompts (drawn from the step and
        round alone, for exact resumes) until ``rollout_batch_size`` groups differ or ppo.dynamic_sampling_rounds extra
        rounds are spent; then dropped groups fill the batch up, so its size never changes.
        Returns (batch with scores, the reward's seconds, sampling/* stats, extra generation seconds)."""
        ppo, n = self.cfg.ppo, self.cfg.generation.n_samples_per_prompt
        wanted, kept, dropped, reward_s, generate_s, rounds = ppo.rollout_batch_size, [], [], 0.0, 0.0, 0
        reward_stats = RewardStats()  # every round's scoring
        while True:
            with phase(times, "score_wall"):
                scored, seconds = self.roles.score(batch, roles=("reward",))
            reward_stats.merge(scored.pop("reward_stats", None))  # (a stand-in for the roles may have none)
            batch, reward_s = batch.with_(**scored), reward_s + seconds["reward"]
            for group in batch.group_ids.unique(sorted=True).tolist():
                rows = (batch.group_ids == group).nonzero().flatten()
                (dropped if bool((batch.scores[rows] == batch.scores[rows[0]]).all()) else kept).append(
                    batch.select(rows))
            if len(kept) >= wanted or rounds == ppo.dynamic_sampling_rounds:
                break
            if cancel is not None and cancel.is_set():
                raise RolloutCancelled()
            rounds += 1
            # as many prompts as the groups seen so far say it takes to fill the batch, at most a batch, in equal
            # shares for the reward actors (a sharded RM's ranks forward equal shares)
            informative, missing = len(kept) / (len(kept) + len(dropped)), wanted - len(kept)
            count = min(wanted, math.ceil(missing / informative) if informative else wanted)
            actors = len(self.roles.rewards)
            count = min(math.ceil(count / actors) * actors, len(self.dataset.prompts) // actors * actors)
            prompts = [self.dataset.prompts[i] for i in refill_prompts(self.cfg.seed, step, rounds, count,
                                                                        len(self.dataset.prompts))]
            with phase(times, "generate"):
                batch, seconds = self.roles.generate(prompts, sampling_seeds(self.cfg.seed, step, count,
                                                                             start=rounds * wanted))
            generate_s += seconds
            batch = batch.with_(group_ids=group_ids(count, n, start=rounds * wanted))
        filled = max(0, wanted - len(kept))
        groups = kept[:wanted] + dropped[:filled]
        stats = {"sampling/rounds": float(rounds), "sampling/equal_groups": float(len(dropped)),
                 "sampling/filled_with_equal": float(filled),
                 "sampling/kept_fraction": len(kept) / max(len(kept) + len(dropped), 1), "reward_stats": reward_stats}
        return RolloutBatch.concat(groups), {"reward": reward_s}, stats, generate_s

    def _take_rollout(self) -> tuple["Rollout", float, bool]:
        """This step's rollout, the seconds waited for it and whether it was made now: the one in hand from an
        unrecorded try of this step, the one prefetched (overlapped), or one made now (always without overlap; the
        first step, after a resume or a recovery; ``inline``: on the step's own time)."""
        if self.in_hand is not None and self.in_hand.step == self.step_count:
            return self.in_hand, 0.0, False
        if self.queue is not None:
            rollout, waited = self.queue.take(self.step_count)
            if rollout is not None:
                return rollout, waited, False
        try:
            return self._rollout(self.step_count), 0.0, True
        except EnginesBehind:  # the learner is between updates here: the engines get its weights, and sample again
            self._sync_engines()
            return self._rollout(self.step_count), 0.0, True

    def _drop_prefetched(self, wait: bool = True) -> None:
        """Forget the rollouts ahead (a learner recovery, a restore, the end of the run); ``wait`` for the call under
        way to end (the engines must be idle before they get other weights)."""
        if getattr(self, "queue", None) is not None:
            self.queue.drop(wait=wait and not local_ray_down())  # with Ray gone, its waits could only time out

    def _score_normalizer(self) -> ScoreNormalizer:
        """models.reward.normalize/clip; 'stored' statistics come from the RM (its reward_stats.json, through the
        reward actor, which also serves them for a Serve RM)."""
        reward = self.cfg.models.reward
        stored = None
        if reward.normalize == "stored":
            stored = self.roles.stored_reward_statistics()
            log.info("reward scores normalised with the RM's stored statistics: %s", stored)
        return ScoreNormalizer(reward.normalize, stored, reward.clip)

    def _recovery_stats(self) -> dict[str, float]:
        seconds, self.roles.recovery_seconds = self.roles.recovery_seconds, 0.0
        return {"recovery/seconds": seconds, **{f"recovery/{role}_restarts": float(count)
                                                for role, count in self.roles.restarts.items()}}

    # ----------------------------------------------------------------------------------- durability
    def driver_state(self) -> dict:
        from rlhf_ray.rewards.serve import recorded_identity

        serve_rm = {"serve_rm": recorded_identity(self.reward_app)} if self.cfg.models.reward.kind == "serve" else {}
        return {"sampling_seeds": "per prompt, from (seed, step): rlhf_ray.drivers.rollout.sampling_seeds",
                "reward_normalizer": self.normalizer.state_dict(), **serve_rm}

    def save_driver_files(self, directory: Path) -> None:
        """ppo.async_steps=k: the next k steps' rollouts, sampled by weights before this checkpoint's (waited for) —
        a resumed run trains on them, as the uninterrupted run would (the restored engines hold newer weights). A stop
        before this step was recorded: its own rollout is the first of them."""
        if self.queue is not None:
            save_rollouts(directory, self.queue.kept(self.step_count, self.in_hand))

    def _scored_as_now(self, rollouts: list[Rollout]) -> list[Rollout]:
        """A checkpoint's prefetched rollouts as this run scores them: saved by a run with a reference (ppo.kl_coef
        changed to 0), their reference log-probs are dropped (no KL now); saved by a run without one (ppo.kl_coef
        changed from 0), they lack the reference's log-probs, so from the first of them on they are sampled again."""
        kept = []
        for rollout in rollouts:
            if not self.has_reference:
                rollout.batch = rollout.batch.with_(ref_logprobs=None)
            elif rollout.batch.ref_logprobs is None and self.cfg.reference_actors:
                break
            kept.append(rollout)
        return kept

    def restore(self, path) -> None:
        """Learners from the checkpoint, the engines from the learners, the step counter and the running score
        statistics from the driver state; with ppo.async_steps=k the rollouts prefetched before it was saved."""
        self._drop_prefetched()  # sampled by other weights; and the engines must be idle before they get new ones
        self.in_hand = None
        state = self.restore_learners(path)
        if self.cfg.models.reward.kind == "serve":  # the pinned version still serves the run's model
            from rlhf_ray.rewards.serve import check_same_model

            check_same_model(self.reward_app, state.get("serve_rm"), path)
        self._sync_engines()
        if self.queue is not None:
            self.queue.put_back(self._scored_as_now(load_rollouts(Path(path))), self.step_count)
        self.normalizer = self._score_normalizer()
        if "reward_normalizer" in state:  # running score statistics as they were after that step
            self.normalizer.load_state_dict(state["reward_normalizer"])
        elif self.cfg.models.reward.normalize == "running":
            log.warning("%s has no running score statistics (saved by an older version): they start afresh", path)
        log.info("resumed from %s: %d of %d steps done", path, self.step_count, self.cfg.num_steps)

    def reset_to_start(self) -> None:
        self._drop_prefetched()  # sampled by weights the learners have left behind
        self.in_hand = None
        self._sync_engines()  # the engines go back to the initial policy with the learners
        self.normalizer = self._score_normalizer()

    def _sync_engines(self) -> None:
        """The learners' policy (after ``step_count`` updates) into the engines now, nothing sampling; overlapped, it
        is also the latest published, which the next rollouts are sampled by."""
        if self.queue is None:
            self.roles.sync_weights()
        else:
            payload, _ = self.roles.publish_weights()
            self.roles.load_weights(payload)
            self.published = (self.step_count, payload)
        self.engine_version = self.step_count

    def save(self, path: str) -> str:
        """The current policy in HF format (safetensors) with its tokenizer."""
        return self.roles.save(path)

    def shutdown(self) -> None:
        if getattr(self, "outage_watch", None) is not None:
            self.outage_watch.stop()
        if hasattr(self, "roles"):
            self.roles.closing = True
        if getattr(self, "queue", None) is not None:
            self.queue.shutdown()  # its calls fail as the actors go; nothing replaces them (closing)
        super().shutdown()

    def finish(self) -> str | None:
        """The checkpoint after the last step (checkpoint.at_end) and the final policy (logging.save_final_model)."""
        self.checkpoint_at_end()
        if self.cfg.logging.save_final_model:
            return self.save(str((Path(self.cfg.output_dir) / "final_model").resolve()))
        return None


def ppo_learner(cfg: ExperimentConfig, paths: ModelPaths) -> LearnerSpec:
    """The learner group of a PPO experiment: the ``ppo`` objective on policy + critic (the policy alone under a
    critic-free ppo.advantage)."""
    learner = cfg.resources.learner
    options = PPOOptions(ppo=cfg.ppo, critic=cfg.ppo.needs_critic, value_init=cfg.models.value_init,
                         value_model=paths.value, temperature=cfg.generation.temperature,
                         max_new_tokens=cfg.generation.max_new_tokens)
    return LearnerSpec(objective="ppo", model=paths.policy, options=options, world_size=learner.num_actors, num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                       mini_batch_size=cfg.ppo.mini_batch_size, micro_batch_size=cfg.ppo.micro_batch_size,
                       epochs=cfg.ppo.epochs, optimizer_steps=cfg.optimizer_steps, optimizer=cfg.optimizer,
                       deepspeed=cfg.deepspeed, timeout_s=cfg.timeouts.learn_s, seed=cfg.seed,
                       export_dtype=cfg.models.dtype, lora=cfg.models.lora)


