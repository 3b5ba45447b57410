"""The LLM judge's engines built in this process (rlhf_ray.rewards.judge.JudgeBackend, no Ray) on the tiny models:
pairwise judging against a baseline policy's answers (judge.baseline). A tiny judge in a PPO run:
tests/test_reward_swap.py."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_baseline_policys_greedy_answers_are_the_pairwise_reference_each_prompt_answered_once(tiny_cache):
    """The baseline's answer to a prompt is the one the generation role gives greedily with that policy (the same
    token ids: rlhf_ray.data's encoding of the prompt text); a prompt seen again is not answered again; one over
    max_length gets no answer and its verdicts count as overlong."""
    from transformers import AutoTokenizer

    from rlhf_ray.actors.generation import GenerationActor
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.data.sources import Prompt, render_tulu
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.rewards.base import RewardSample
    from rlhf_ray.rewards.judge import JudgeBackend

    judge_path, baseline_path = resolve_model("tiny:policy", tiny_cache), resolve_model("tiny:policy-tied", tiny_cache)
    cfg = RewardConfig(kind="judge", model="tiny:policy", max_length=600,
                       judge={"mode": "pairwise", "baseline": baseline_path, "baseline_max_tokens": 6,
                              "max_tokens": 4})
    judge = JudgeBackend(cfg, model_path=judge_path)
    questions = ["Name a colour.", "Add two and two.", "word " * 700]
    messages = [[{"role": "user", "content": q}] for q in questions]
    texts = [render_tulu(m) for m in messages]
    generate = judge.baseline.llm.generate
    calls = []
    judge.baseline.llm.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)

    encode, judged = judge.encode, []
    judge.encode = lambda text: judged.append(text) or encode(text)

    samples = [RewardSample.of(m, t, "Blue, I think.") for m, t in zip(messages, texts)]
    scores = judge.score(samples)
    assert scores.shape == (3,) and all(0.0 <= s <= 1.0 for s in scores[:2].tolist())
    assert scores[2].item() == cfg.judge.unparsed_score
    assert judge.take_stats().means["judge_overlong"] == (1.0, 3)  # (sum of per-sample shares, samples)
    assert calls == [2] and judge.baseline.answers[texts[2]] is None  # too long: not answered

    tokenizer = AutoTokenizer.from_pretrained(baseline_path)
    prompts = [Prompt(text=t, token_ids=tokenizer(t)["input_ids"], messages=m) for t, m in zip(texts[:2], messages)]
    assert [judge.baseline.encode(t) for t in texts[:2]] == [p.token_ids for p in prompts]
    policy = GenerationActor(baseline_path, {"max_new_tokens": 6, "temperature": 0.0}, 256, seed=0)
    greedy, _ = policy.generate(prompts, [0, 1])
    assert [judge.baseline.answers[t] for t in texts[:2]] == greedy.response_texts and all(greedy.response_texts)
    for i, answer in enumerate(greedy.response_texts):  # in both orders, beside the judged response
        both = judged[2 * i:2 * i + 2]
        assert all(answer in text and "Blue, I think." in text for text in both) and both[0] != both[1]

    again = judge.score([RewardSample.of(messages[0], texts[0], "Red.")])  # a prompt answered before
    assert calls == [2] and again.shape == (1,)
