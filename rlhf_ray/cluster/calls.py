"""The coarse calls the driver makes on the roles: a rollout split over the engines, scoring, the learner's update and
forward passes, weight sync, memory readings, saving and loading — each waited for with its timeout, the rollout
roles' calls redone on replacements when an actor is lost."""
from __future__ import annotations

import logging

import torch

from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.rewards.stats import RewardStats
from rlhf_ray.runtime.spans import clock
from rlhf_ray.runtime.waiting import ActorLost

log = logging.getLogger("rlhf_ray.cluster.roles")  # (its records have always been the roles')


class RoleCalls:
    """The part of ``rlhf_ray.cluster.roles.Roles`` the driver calls once the roles are up."""

    def generate(self, prompts, seeds: list[int]) -> tuple[RolloutBatch, float]:
        """Prompts (each with its sampling seed) split over the generation actors in order, as evenly as they go (an
        actor may get one more); returns the joined batch, rows in the order of the prompts, and compute seconds."""
        share, extra = divmod(len(prompts), len(self.generators))
        bounds = [i * share + min(i, extra) for i in range(len(self.generators) + 1)]
        # self.generators is read at each call: a retry after a lost actor goes to its replacement
        results = self._recoverable("generation", "sampling a rollout", "generate_s", lambda: [
            g.generate.remote(prompts[bounds[i]:bounds[i + 1]], seeds[bounds[i]:bounds[i + 1]])
            for i, g in enumerate(self.generators) if bounds[i + 1] > bounds[i]])
        return RolloutBatch.concat([b for b, _ in results]), max(s for _, s in results)

    def score(self, batch: RolloutBatch, roles: tuple[str, ...] = ("reward", "reference", "learner"),
              old_logprobs: bool = True) -> tuple[dict, dict]:
        """Of ``roles``, concurrently: reward scores, reference logprobs, the learner's values (and its old logprobs
        unless the sampler's serve: ``old_logprobs=False``). Without reference actors (models.lora) the learner
        computes the reference logprobs, in the same call (a run without a reference asks for none). Returns the tensors
        (and, with the reward's scores, ``reward_stats``: what the reward backends recorded, merged over the actors:
        rlhf_ray.rewards.stats) and each role's compute seconds."""
        reference_in_learner = "reference" in roles and "reference" not in self.groups
        learner = "learner" in roles

        def submit(role: str, method: str, **options):
            return lambda: [getattr(a, method).remote(part, **options)
                            for a, part in zip(self.groups[role], batch.chunks(len(self.groups[role])))]

        learner_work = ", ".join(what for what, asked in (("values", learner), ("old logprobs", learner and old_logprobs),
                                                         ("reference logprobs", reference_in_learner)) if asked)
        calls = {"reward": (submit("reward", "scored"), "scoring a rollout", "score_s"),
                 "reference": (submit("reference", "logprobs"), "computing logprobs", "score_s"),
                 "learner": (submit("learner", "evaluate", logprobs=learner and old_logprobs, values=learner,
                                    reference=reference_in_learner), f"computing {learner_work}", "learn_s")}
        wanted = set(roles)
        if reference_in_learner:
            wanted = (wanted - {"reference"}) | {"learner"}
        calls = {role: call for role, call in calls.items() if role in wanted}
        pending = {role: call[0]() for role, call in calls.items()}  # all at the same time
        results = {role: self._recoverable(role, doing, timeout, again, pending[role])
                   for role, (again, doing, timeout) in calls.items()}
        out = {}
        if "reward" in results:
            out["scores"] = torch.cat([scores for (scores, _), _ in results["reward"]])
            out["reward_stats"] = RewardStats.merged(stats for (_, stats), _ in results["reward"])
        if "reference" in results:
            out["ref_logprobs"] = torch.cat([logprobs for logprobs, _ in results["reference"]])
        if "learner" in results:  # the objective's evaluate: a dict of what it computed
            for key in results["learner"][0][0]:
                out[key] = torch.cat([part[key] for part, _ in results["learner"]])
        seconds = {("values" if role == "learner" else role): max(s for _, s in parts) for role, parts in results.items()}
        return out, seconds

    def stored_reward_statistics(self) -> dict | None:
        """The RM's saved score statistics (reward_stats.json), as the reward backend reads them."""
        return self._wait(self.rewards[0].stored_statistics.remote(), "reward", "reading the RM's stored statistics",
                          "score_s")

    def learn(self, batch) -> tuple[dict, float]:
        """The objective's update on equal shards of ``batch``; its stats summed over ranks (each rank reports
        its share of the global means), ``optim/*`` as rank 0 has them."""
        parts = self._wait([a.train.remote(part) for a, part in zip(self.learners, batch.chunks(len(self.learners)))],
                           "learner", f"running the {self.learner_spec.objective} update", "learn_s")
        stats = {key: value if key.startswith("optim/") else sum(p[key] for p, _ in parts)
                 for key, value in parts[0][0].items()}
        return stats, max(s for _, s in parts)

    def evaluate(self, batch) -> tuple[list, float]:
        """The objective's forward passes (no update) on equal shards of ``batch``: each rank's result."""
        parts = self._wait([a.evaluate.remote(part) for a, part in zip(self.learners, batch.chunks(len(self.learners)))],
                           "learner", "evaluating", "learn_s")
        return [out for out, _ in parts], max(s for _, s in parts)

    def sync_weights(self, generators: list | None = None) -> dict:
        """The learner's current policy into every generation actor (or those given) by ``weights.transport``
        (rlhf_ray.weights.sync)."""
        return self.weights.sync(generators)

    def publish_weights(self) -> tuple[object, float]:
        """Overlapped runs: the learner's current policy published once (``load_weights`` takes it into the engines
        later); returns the payload and the learner's seconds."""
        return self.weights.publish()

    def load_weights(self, payload) -> dict:
        """Overlapped runs: a published policy into every generation actor (a lost one replaced); the seconds of the
        slowest load and the first engine's report."""
        return self.weights.load(payload)

    def learner_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        results = self._wait([a.sequence_logprobs.remote(prompt_ids, response_ids) for a in self.learners], "learner",
                             "computing logprobs of a response", "learn_s")
        return results[0][0]

    def generator_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[list[float]]:
        return self._wait([g.sequence_logprobs.remote(prompt_ids, response_ids) for g in self.generators],
                          "generation", "computing logprobs of a response", "generate_s")

    def learner_parameters(self, trainable: bool = True) -> int:
        """The learner's trainable parameters, or with ``trainable=False`` its frozen ones (a LoRA policy's base)."""
        return self._wait(self.learners[0].num_parameters.remote(trainable=trainable), "learner", "counting parameters",
                          "learn_s")

    def memory(self) -> dict[str, float]:
        """Each role's peak resident memory since the last call and the shared (object-store) part of its
        resident memory now, max over its actors, in GB. The same call hands over the spans each actor recorded
        (``taken_spans``: actor name -> (its SpanRecorder.take(), our clock when asked, when answered), for the
        timeline, rlhf_ray.run.timeline)."""
        sent = clock()
        refs = {role: [a.memory.remote() for a in group] for role, group in self.groups.items()}
        out = {}
        for role, role_refs in refs.items():
            try:
                timeout = "learn_s" if role == "learner" else "score_s"  # a learner-only run has no score_s
                readings = self._wait(role_refs, role, "reading its memory", timeout)
            except ActorLost as lost:  # the next phase that needs the role replaces it
                log.warning("%s", lost)
                continue
            received = clock()
            for i, reading in enumerate(readings):
                if "spans" in reading:
                    self.taken_spans[f"{role}-{i}"] = (reading["spans"], sent, received)
            out[f"memory/{role}_peak_gb"] = max(r["peak_gb"] for r in readings)
            out[f"memory/{role}_shared_gb"] = max(r["shared_gb"] for r in readings)
        return out

    def take_spans(self) -> dict[str, tuple[dict, float, float]]:
        """The actors' spans handed over since the last call (``memory``)."""
        taken, self.taken_spans = self.taken_spans, {}
        return taken

    def save(self, path: str) -> str:
        results = self._wait([a.save.remote(path) for a in self.learners], "learner", "saving the model", "learn_s")
        return results[0]

    def save_state(self, directory: str) -> None:
        self._wait([a.save_state.remote(directory) for a in self.learners], "learner", "saving a checkpoint", "learn_s")

    def load_state(self, directory: str) -> None:
        self._wait([a.load_state.remote(directory) for a in self.learners], "learner", "loading a checkpoint",
                   "learn_s")

