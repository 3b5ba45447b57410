"""The ``model`` reward backend: a frozen HF sequence-classification RM in the reward actors (or a Serve replica), with
its own tokenizer and chat template."""
from __future__ import annotations

import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.base import RewardBackend, RewardSample, read_reward_stats, require_reward_stats


class ModelBackend(RewardBackend):
    """A frozen sequence-classification RM with its own tokenizer, reading conversations through
    ``modeling.encode_conversations`` — the encoding RM training and evaluation use, so scores agree."""

    def __init__(self, cfg: RewardConfig, *, model_path: str, dtype: str = "float32", num_gpus: float = 0.0,
                 sharded: bool = False):
        from rlhf_ray.models.forward import ForwardOptions
        from rlhf_ray.models.modeling import load_reward_model, load_reward_tokenizer
        from rlhf_ray.models.sharding import load_sharded
        from rlhf_ray.runtime.devices import device_for

        super().__init__(cfg)
        self.path, self.dtype = model_path, dtype
        if cfg.normalize == "stored":
            require_reward_stats(model_path, f"the reward model {cfg.model}")  # fail at start, not after a rollout
        self.tokenizer = load_reward_tokenizer(model_path)
        if sharded:  # this process is one rank of a group that holds the RM (rlhf_ray.models.sharding)
            self.model = load_sharded(lambda: load_reward_model(model_path, dtype), dtype)
        else:
            self.model = load_reward_model(model_path, dtype, num_gpus).eval()
            if num_gpus <= 1:
                self.model.to(device_for(num_gpus))
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # HF pools at the last non-pad token
        # scored on real tokens only (rlhf_ray.models.forward), where the load-time check shows the RM allows it
        self.padding_free = ForwardOptions().checked(self.model, f"reward model {cfg.model}").padding_free

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        from rlhf_ray.models.forward import sequence_scores
        from rlhf_ray.models.modeling import encode_conversations
        from rlhf_ray.models.sharding import release_gathered

        cfg, scores = self.cfg, []
        with torch.no_grad():
            for start in range(0, len(samples), cfg.batch_size):
                chunk = [s.messages for s in samples[start:start + cfg.batch_size]]
                enc = encode_conversations(self.tokenizer, chunk, cfg.template, cfg.max_length).to(self.model.device)
                scores.append(sequence_scores(self.model, enc.input_ids, enc.attention_mask, self.padding_free).cpu())
        release_gathered(self.model)
        scores = torch.cat(scores) if scores else torch.zeros(0)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the reward model ({cfg.model}) scored {len(bad)} of {len(scores)} samples "
                             f"{scores[bad[0]].item()} (first: sample {bad[0]}, response "
                             f"{samples[bad[0]].response[:80]!r}); scores must be finite — check its weights "
                             "and models.dtype (float16 overflows)")
        return scores

    def cache_identity(self) -> dict | None:
        from rlhf_ray.rewards.cache import model_fingerprint

        fingerprint = model_fingerprint(self.path)
        return None if fingerprint is None else {
            "kind": "model", "path": self.path, "files": fingerprint, "template": self.cfg.template,
            "max_length": self.cfg.max_length, "dtype": self.dtype}

    def stored_statistics(self) -> dict | None:
        if self.cfg.normalize == "stored":
            return require_reward_stats(self.path, f"the reward model {self.cfg.model}")
        return read_reward_stats(self.path)
