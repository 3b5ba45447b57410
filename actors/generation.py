"""Generation role: a vLLM engine that samples responses and their logprobs, and takes new weights."""
from __future__ import annotations

import os

from actors.common import timed
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import GenerationConfig
from rlhf_ray.data import Prompt

# vLLM on CPU (DESIGN.md): 1 GiB KV cache instead of ~9; the in-process engine starts in ~4 s instead
# of ~20 and accepts tensors (the weight iterator) in collective_rpc directly.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class GenerationActor:
    def __init__(self, model_path: str, generation: dict, max_model_len: int, seed: int,
                 tensor_parallel_size: int = 1, dtype: str = "float32", num_gpus: float = 0.0):
        import torch
        if num_gpus == 0 or not torch.cuda.is_available():
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM

        self.cfg = GenerationConfig(**generation)
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=True, gpu_memory_utilization=0.85)
        tokenizer = self.llm.get_tokenizer()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _sampling_params(self, **overrides):
        from vllm import SamplingParams

        params = dict(n=self.cfg.n_samples_per_prompt, max_tokens=self.cfg.max_new_tokens,
                      temperature=self.cfg.temperature, top_p=self.cfg.top_p, stop=self.cfg.stop or None,
                      logprobs=0)  # logprobs=0: the sampled token's own logprob
        params.update(overrides)
        return SamplingParams(**params)

    @timed
    def generate(self, prompts: list[Prompt]) -> RolloutBatch:
        """``n_samples_per_prompt`` responses per prompt as a padded RolloutBatch (rows grouped by prompt)."""
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts],
                                    self._sampling_params(), use_tqdm=False)
        rows = {k: [] for k in ("prompts", "responses", "logprobs", "eos", "messages", "ptexts", "rtexts")}
        for prompt, out in zip(prompts, outputs):
            for sample in out.outputs:
                ids = list(sample.token_ids)
                rows["prompts"].append(prompt.token_ids)
                rows["responses"].append(ids)
                rows["logprobs"].append([lp[t].logprob for lp, t in zip(sample.logprobs, ids)])
                rows["eos"].append(sample.finish_reason == "stop")  # EOS or a configured stop string
                rows["messages"].append(prompt.messages)
                rows["ptexts"].append(prompt.text)
                rows["rtexts"].append(sample.text)
        return RolloutBatch.from_samples(rows["prompts"], rows["responses"], rows["logprobs"], rows["eos"],
                                         rows["messages"], rows["ptexts"], rows["rtexts"], self.pad_token_id)

    @timed
    def load_weights(self, buckets: list, timeout_s: float) -> int:
        """Load published weights bucket by bucket (list of ObjectRefs of [(name, tensor)]); returns #tensors."""
        import ray

        loaded = 0

        def weights():
            nonlocal loaded
            for ref in buckets:
                for name, tensor in ray.get(ref, timeout=timeout_s):
                    loaded += 1
                    yield name, tensor

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        return loaded

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's logprobs of a given response (prompt_logprobs), for weight-sync checks."""
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + response_ids)],
                                self._sampling_params(n=1, max_tokens=1, prompt_logprobs=0, logprobs=None),
                                use_tqdm=False)[0]
        tail = out.prompt_logprobs[len(prompt_ids):]
        return [lp[t].logprob for lp, t in zip(tail, response_ids)]
