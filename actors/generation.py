"""Generation role: a vLLM engine that samples responses and their logprobs, and takes new weights."""
from __future__ import annotations

import os

from actors.common import Role, computes
from rlhf_ray.batch import RolloutBatch
from rlhf_ray.config import GenerationConfig
from rlhf_ray.data import Prompt

# vLLM on CPU (verified, shared DESIGN notes): 1 GiB KV cache instead of ~9; the in-process engine
# starts in ~4 s instead of ~20 and accepts tensors (the weight iterator) in collective_rpc directly.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class GenerationActor(Role):
    def __init__(self, model_path: str, generation: dict, max_model_len: int, seed: int,
                 tensor_parallel_size: int = 1, dtype: str = "float32", num_gpus: float = 0.0,
                 log_file: str | None = None):
        super().__init__(log_file)
        import torch
        if num_gpus == 0 or not torch.cuda.is_available():
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
        from vllm import LLM

        self.cfg = GenerationConfig(**generation)
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and tensor_parallel_size == 1
        self.weight_loading = self.cfg.weight_loading
        if self.weight_loading == "auto":
            self.weight_loading = "iterator" if in_process else "files"
        # TP workers as processes inside this actor (it owns its GPUs), not as Ray tasks on other bundles.
        backend = {"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=True, gpu_memory_utilization=0.85,
                       logprobs_mode="processed_logprobs",  # after temperature: the distribution PPO trains
                       **backend)
        tokenizer = self.llm.get_tokenizer()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _sampling_params(self, **overrides):
        from vllm import SamplingParams

        params = dict(n=self.cfg.n_samples_per_prompt, max_tokens=self.cfg.max_new_tokens,
                      temperature=self.cfg.temperature, top_p=self.cfg.top_p, stop=self.cfg.stop or None,
                      logprobs=0)  # logprobs=0: the sampled token's own logprob
        params.update(overrides)
        return SamplingParams(**params)

    @computes("generate")
    def generate(self, prompts: list[Prompt], seeds: list[int]) -> RolloutBatch:
        """``n_samples_per_prompt`` responses per prompt as a padded RolloutBatch (rows grouped by prompt).

        Each prompt is sampled with its own seed (its samples with seed, seed+1, …): the same step
        draws the same responses from the same weights, whatever ran before it on this engine —
        a resumed or recovered run reproduces the uninterrupted one.
        """
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts],
                                    [self._sampling_params(seed=seed) for seed in seeds], use_tqdm=False)
        rows = {k: [] for k in ("prompts", "responses", "logprobs", "finish", "messages", "ptexts", "rtexts")}
        for prompt, out in zip(prompts, outputs):
            for sample in out.outputs:
                ids = list(sample.token_ids)
                rows["prompts"].append(prompt.token_ids)
                rows["responses"].append(ids)
                rows["logprobs"].append([lp[t].logprob for lp, t in zip(sample.logprobs, ids)])
                rows["finish"].append(sample.finish_reason)
                rows["messages"].append(prompt.messages)
                rows["ptexts"].append(prompt.text)
                rows["rtexts"].append(sample.text)
        return RolloutBatch.from_samples(rows["prompts"], rows["responses"], rows["logprobs"], rows["finish"],
                                         rows["messages"], rows["ptexts"], rows["rtexts"], self.pad_token_id)

    @computes("generate")
    def load_weights(self, buckets: list, timeout_s: float) -> dict:
        """Load published weights (a list of ObjectRefs of [(name, tensor)] buckets) into the engine.

        Every weight the engine expects must arrive, and layers sharing a tensor (tied embeddings) are
        re-processed: ``rlhf_ray.weights.engine.load_into_engine``. Returns its report from the first worker.
        """
        import ray

        from rlhf_ray.weights.engine import load_into_engine

        if self.weight_loading == "iterator":
            weights = ((name, tensor) for ref in buckets for name, tensor in ray.get(ref, timeout=timeout_s))
            reports = self.llm.collective_rpc(load_into_engine, kwargs={"weights": weights})
        else:
            self._write_weight_files(buckets, timeout_s)
            reports = self.llm.collective_rpc(load_into_engine, kwargs={"directory": self._weights_dir})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        return reports[0]

    def _write_weight_files(self, buckets: list, timeout_s: float) -> int:
        """One safetensors file per published bucket in a per-actor dir (RAM-backed /dev/shm when present)."""
        import tempfile

        import ray
        from safetensors.torch import save_file

        if not hasattr(self, "_weights_dir"):
            self._weights_dir = tempfile.mkdtemp(prefix="rlhf_ray_weights_",
                                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        for old in os.listdir(self._weights_dir):
            os.remove(os.path.join(self._weights_dir, old))
        written = 0
        for i, ref in enumerate(buckets):
            bucket = dict(ray.get(ref, timeout=timeout_s))
            save_file(bucket, os.path.join(self._weights_dir, f"bucket-{i:05d}.safetensors"))
            written += len(bucket)
        return written

    def close(self) -> None:
        """Remove the weight files (they live in RAM when in /dev/shm)."""
        import shutil

        if hasattr(self, "_weights_dir"):
            shutil.rmtree(self._weights_dir, ignore_errors=True)

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's logprobs of a given response (prompt_logprobs: at temperature 1, from the raw
        logits), for weight-sync checks."""
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + response_ids)],
                                self._sampling_params(n=1, max_tokens=1, prompt_logprobs=0, logprobs=None),
                                use_tqdm=False)[0]
        tail = out.prompt_logprobs[len(prompt_ids):]
        return [lp[t].logprob for lp, t in zip(tail, response_ids)]
