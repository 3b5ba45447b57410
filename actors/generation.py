"""Generation role: a vLLM engine that samples responses and their logprobs, and takes new weights."""
from __future__ import annotations

from rlhf_ray.actors.role import Role, computes
from rlhf_ray.config import GenerationConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.sources import Prompt
from rlhf_ray.runtime.engines import GPU_MEMORY_UTILIZATION, engine_options, prepare_vllm_process
from rlhf_ray.runtime.spans import annotate


class GenerationActor(Role):
    def __init__(self, model_path: str, generation: dict, max_model_len: int, seed: int,
                 tensor_parallel_size: int = 1, dtype: str = "float32", num_gpus: float = 0.0,
                 weight_transport: str = "object_store", lora_rank: int | None = None, log_file: str | None = None):
        super().__init__(log_file)
        prepare_vllm_process(num_gpus, dtype, tensor_parallel_size)
        from vllm import LLM

        from rlhf_ray.weights import make_transport

        self.cfg = GenerationConfig(**generation)
        transport = make_transport(weight_transport)
        self.transports = {weight_transport: transport}  # one of each kind: they keep state
        self.default_transport = weight_transport
        self.tensor_parallel_size = tensor_parallel_size
        # TP workers as processes inside this actor (it owns its GPUs), not as Ray tasks on other bundles.
        backend = {"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}
        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=True, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                       logprobs_mode="processed_logprobs",  # after temperature: the distribution PPO trains
                       **backend, **transport.engine_options(lora_rank), **engine_options(num_gpus, max_model_len))
        tokenizer = self.llm.get_tokenizer()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def adapter(self):
        """The vLLM LoRA adapter the engine samples with (weights.transport=adapter), None for the base weights (before
        the first update the adapters are zero: the base is the policy)."""
        return next((t.lora_request for t in self.transports.values() if t.lora_request is not None), None)

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
                                    [self._sampling_params(seed=seed) for seed in seeds], use_tqdm=False,
                                    lora_request=self.adapter)
        rows = {k: [] for k in ("prompts", "responses", "logprobs", "finish", "messages", "ptexts", "rtexts", "labels",
                                  "fields")}
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
                rows["labels"].append(prompt.label)
                rows["fields"].append(prompt.fields)
        annotate(tokens=sum(len(r) for r in rows["responses"]), sequences=len(rows["responses"]))
        return RolloutBatch.from_samples(rows["prompts"], rows["responses"], rows["logprobs"], rows["finish"],
                                         rows["messages"], rows["ptexts"], rows["rtexts"], self.pad_token_id,
                                         labels=rows["labels"], prompt_fields=rows["fields"])

    @computes("generate")
    def load_weights(self, payload, timeout_s: float, transport: str | None = None) -> dict:
        """Take one weight update by this actor's transport (rlhf_ray.weights), or by ``transport`` when given:
        ``payload`` is what the learner published (object refs of buckets) or, for a broadcast, the bucket layout.
        Every weight the engine expects must arrive, and layers sharing a tensor (tied embeddings) are re-processed
        (``rlhf_ray.weights.engine.load_into_engine``). Returns its report from the first worker."""
        from rlhf_ray.weights import make_transport

        name = transport or self.default_transport
        if name not in self.transports:
            self.transports[name] = make_transport(name)
        report = self.transports[name].load(self.llm, payload, timeout_s)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        annotate(bytes=report.get("bytes", 0), tensors=report.get("received", 0))
        return report

    @computes("generate")
    def load_policy(self, directory: str) -> dict:
        """Take the weights of a saved policy (an HF model directory: a checkpoint's policy/) in place of the engine's:
        one engine answers for every checkpoint of a run (rlhf_ray.compare_rewards) without a restart each."""
        from rlhf_ray.weights.engine import load_into_engine

        report = self.llm.collective_rpc(load_into_engine, kwargs={"directory": directory})[0]
        self.llm.reset_prefix_cache()
        return report

    def join_weight_group(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> list:
        """Every worker of this engine joins the weight-broadcast group (ranks first_rank, first_rank + 1, …)."""
        from rlhf_ray.weights.collective import worker_join

        return self.llm.collective_rpc(worker_join, kwargs=dict(host=host, port=port, first_rank=first_rank,
                                                                 world_size=world_size, timeout_s=timeout_s))

    def close(self) -> None:
        """Leave the weight group, remove weight files (they live in RAM when in /dev/shm) and stop the engine's
        worker processes, if it has any (their shared-memory queues would outlive a killed actor)."""
        from rlhf_ray.weights.collective import worker_leave

        for transport in self.transports.values():
            transport.close()
        self.llm.collective_rpc(worker_leave)
        if self.tensor_parallel_size > 1:
            self.llm.llm_engine.engine_core.shutdown()

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's logprobs of a given response (prompt_logprobs: at temperature 1, from the raw
        logits), for weight-sync checks."""
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids + response_ids)],
                                self._sampling_params(n=1, max_tokens=1, prompt_logprobs=0, logprobs=None),
                                use_tqdm=False, lora_request=self.adapter)[0]
        tail = out.prompt_logprobs[len(prompt_ids):]
        return [lp[t].logprob for lp, t in zip(tail, response_ids)]

