"""Run as a script (vLLM's CPU engine binds threads, so tests start it in a subprocess):

    python tests/weight_sync_architectures.py llama,llama-tied,... [--stock]

For each architecture: build a tiny random HF model, load it into a vLLM engine, perturb every weight
on the HF side, push the new weights into the engine (``rlhf_ray.weights.engine.load_into_engine``, or vLLM's
stock ``reload_weights`` with --stock) and print one ``RESULT{json}`` line per architecture with the
largest |vLLM − HF| prompt logprob before and after the update.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from architectures import ARCHITECTURES, build  # noqa: E402

from rlhf_ray.models.tiny import build_tokenizer  # noqa: E402
from rlhf_ray.weights.engine import load_into_engine  # noqa: E402

TEXT = "<|user|>\nWrite a poem about the sea.\n<|assistant|>\nThe sea is wide and deep and blue.</s>"
def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    names, stock = sys.argv[1].split(","), "--stock" in sys.argv
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    targets = torch.tensor(ids[1:])

    def hf_logprobs(model):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        return logprobs.gather(-1, targets[:, None]).squeeze(-1)

    def engine_logprobs(llm):
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:])])

    for name in names:
        model = build(name, tokenizer)
        path = tempfile.mkdtemp(prefix=f"sync_{name}_")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        llm = LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
        before = (engine_logprobs(llm) - hf_logprobs(model)).abs().max().item()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        weights = ((n, p.detach()) for n, p in model.named_parameters())  # a tied head appears once
        if stock:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            report = {}
        else:
            report = llm.collective_rpc(load_into_engine, kwargs={"weights": weights})[0]
        llm.reset_prefix_cache()
        after = (engine_logprobs(llm) - hf_logprobs(model)).abs().max().item()
        print("RESULT" + json.dumps({"name": name, "tied": bool(model.config.tie_word_embeddings), "before": before,
                                     "after": after, **report}), flush=True)
        del llm


if __name__ == "__main__":
    main()
