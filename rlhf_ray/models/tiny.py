"""Tiny offline models: a Llama policy, a Llama reward model and a BPE tokenizer trained on the fly.

Nothing is downloaded. Everything is built deterministically from a seed and saved with
``save_pretrained`` (safetensors) into a cache dir, then reused. Config specs ``tiny:policy``,
``tiny:policy-tied`` (input and output embeddings tied, like SmolLM2 / Llama-3.2 1B) and ``tiny:reward``
resolve here through ``rlhf_ray.models.specs``.

    python -m rlhf_ray.models.tiny [--cache-dir DIR] [--seed 0]     # builds both and prints their paths
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

TINY_PREFIX = "tiny:"
TINY_KINDS = ("policy", "reward", "policy-tied")  # order seeds each model: append only
BUILD_VERSION = "v2"  # bump when the architecture or the corpus changes: old caches are then ignored

EOS, PAD, BOS = "</s>", "<pad>", "<s>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# The Tulu 2 chat template (open-instruct): <|user|>\n…\n<|assistant|>\n…</s>\n
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)

# Small embedded corpus: enough to learn common English merges; byte-level BPE covers any other text.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A helpful assistant answers the question clearly.
Write a short poem about the sea. Explain how a rainbow forms in simple words.
Give me three tips for staying healthy: sleep well, eat vegetables and walk every day.
What is the capital of France? The capital of France is Paris.
Summarize the following text in one sentence. Translate this sentence into German.
How do I sort a list in Python? Use the sorted function or the sort method of the list.
Reinforcement learning from human feedback trains a reward model and then optimizes the policy.
The weather today is sunny with a light breeze, and the temperature is pleasant.
Please list five fruits that are red: apple, strawberry, cherry, raspberry and watermelon.
Tell me a story about a brave little robot who wanted to see the stars.
Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Why is the sky blue? Sunlight is scattered by the molecules of the air, and blue light scatters most.
"""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf_ray"))


def resolve_tiny(kind: str, cache_dir: str | Path | None = None, seed: int = 0) -> str:
    """``tiny:<kind>`` -> the local directory of that model, built (once) into the cache dir."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model '{TINY_PREFIX}{kind}': use one of {[TINY_PREFIX + k for k in TINY_KINDS]}")
    return str(build_tiny_models(cache_dir, seed) / kind)


def build_tiny_models(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build tokenizer + policy + reward model into ``<cache>/tiny-<version>-seed<seed>``; reuse if present."""
    root = Path(cache_dir or default_cache_dir()) / f"tiny-{BUILD_VERSION}-seed{seed}"
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        tokenizer = build_tokenizer()
        for kind in TINY_KINDS:
            model = build_model(kind, tokenizer, seed)
            model.save_pretrained(staging / kind, safe_serialization=True)
            tokenizer.save_pretrained(staging / kind)
        (staging / "COMPLETE").write_text(f"{BUILD_VERSION} seed={seed}\n")
        try:
            staging.rename(root)  # atomic: concurrent builders race here and one wins
        except OSError:
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def build_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE trained on the embedded corpus, with Tulu chat template and EOS ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=SPECIAL_TOKENS[3:])
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    return tokenizer


def build_model(kind: str, tokenizer, seed: int):
    """A ~0.6M-parameter Llama (head_dim 32: vLLM's CPU attention needs ≥ 32) as policy or RM.

    ``policy-tied`` shares one matrix between the input embedding and the output head: the layout whose
    weight sync needs care (vLLM on CPU repacks the head separately from the embedding)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=kind == "policy-tied", torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )
    torch.manual_seed(seed + TINY_KINDS.index(kind))
    cls = LlamaForSequenceClassification if kind == "reward" else LlamaForCausalLM
    model = cls(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: $RLHF_RAY_CACHE or ~/.cache/rlhf_ray")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind in TINY_KINDS:
        print(f"{TINY_PREFIX}{kind}: {resolve_tiny(kind, args.cache_dir, args.seed)}")


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------------- preference pairs

_KIND = ["Sure, happy to help: here is a clear answer.", "Of course. Thank you for asking, here it is.",
         "Good question; a helpful answer follows.", "Gladly. Here is a kind and clear reply."]
_RUDE = ["No. Figure it out yourself.", "Whatever, that is a bad question.", "I will not bother with this.",
         "Wrong question, go away."]


def tiny_preferences(prompts_file: str | Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` learnable preference rows in the Tulu 2.5 schema over the prompts of ``prompts_file``: the chosen
    response is polite and helpful, the rejected one rude (source 'polite-vs-rude'), or the chosen one answers
    at length and the rejected one is a single word (source 'full-vs-terse')."""
    import json
    import random

    rng = random.Random(seed)
    prompts = [json.loads(line)["messages"] for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    rows = []
    for i in range(n):
        prompt = prompts[rng.randrange(len(prompts))]
        if i % 2 == 0:
            source, chosen, rejected = "polite-vs-rude", rng.choice(_KIND), rng.choice(_RUDE)
        else:
            topic = prompt[-1]["content"].rstrip(".?!").lower()
            source, chosen, rejected = ("full-vs-terse", f"Here is my answer to '{topic}', step by step, with an "
                                        "example and a short summary at the end.", rng.choice(["Ok.", "No.", "Hm."]))
        rows.append({"chosen": [*prompt, {"role": "assistant", "content": chosen}],
                     "rejected": [*prompt, {"role": "assistant", "content": rejected}], "source": source})
    return rows


def tiny_conversations(prompts_file: str | Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` learnable SFT rows ({"messages": [...]}) over the prompts of ``prompts_file``: a helpful answer that
    repeats the request, and every third conversation a second turn (a thank-you and its reply), every fourth one
    with a system message."""
    import json
    import random

    rng = random.Random(seed)
    prompts = [json.loads(line)["messages"] for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    rows = []
    for i in range(n):
        prompt = prompts[rng.randrange(len(prompts))]
        topic = prompt[-1]["content"].rstrip(".?!").lower()
        messages = [{"role": "system", "content": "You are a kind assistant."}] if i % 4 == 0 else []
        messages += [*prompt, {"role": "assistant", "content": f"Gladly. Here is my answer to '{topic}', with an "
                                                                "example and a short summary."}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": rng.choice(["Thanks!", "Thank you.", "Great, thanks."])},
                         {"role": "assistant", "content": "You are welcome. Ask me anything else."}]
        rows.append({"messages": messages})
    return rows
