"""The rollout batch layout, the driver's advantage phase and the logprob alignment under padding."""
from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import PPOConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.drivers.rollout import with_advantages

PAD = 0


def make_batch(prompts, responses, eos=None):
    n = len(prompts)
    return RolloutBatch.from_samples(prompts, responses, [[-1.0] * len(r) for r in responses],
                                     ["stop" if e else "length" for e in (eos or [True] * n)], [[{"role": "user", "content": "q"}]] * n, ["p"] * n,
                                     ["r"] * n, pad_token_id=PAD)


def test_from_samples_left_pads_prompts_and_right_pads_responses():
    b = make_batch([[5, 6, 7], [8]], [[9], [10, 11, 12]])
    assert b.prompt_length == 3 and b.response_length == 3
    assert b.input_ids.tolist() == [[5, 6, 7, 9, PAD, PAD], [PAD, PAD, 8, 10, 11, 12]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3]]
    assert b.response_ids.tolist() == [[9, PAD, PAD], [10, 11, 12]]
    assert b.gen_logprobs.tolist() == [[-1, 0, 0], [-1, -1, -1]]


def test_concat_repads_and_select_chunks_keep_rows_together():
    a, b = make_batch([[1, 2]], [[3]]), make_batch([[4, 5, 6]], [[7, 8]])
    joined = RolloutBatch.concat([a, b])
    assert joined.input_ids.tolist() == [[PAD, 1, 2, 3, PAD], [4, 5, 6, 7, 8]]
    assert joined.response_mask.tolist() == [[1, 0], [1, 1]] and joined.gen_logprobs.shape == (2, 2)
    assert joined.select([1]).input_ids.tolist() == [[4, 5, 6, 7, 8]]
    assert [len(c) for c in RolloutBatch.concat([a, b, a, b]).chunks(2)] == [2, 2]
    with pytest.raises(ValueError, match="equal shards"):
        joined.chunks(3)


def test_with_advantages_places_score_at_last_token_and_penalises_kl():
    b = make_batch([[1], [1]], [[2, 3, 4], [5]], eos=[True, False])
    b = b.with_(scores=torch.tensor([1.0, 2.0]), values=torch.zeros(2, 3),
                old_logprobs=torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]]),
                ref_logprobs=torch.tensor([[-1.5, -1.0, -1.0], [-1.0, 0.0, 0.0]]))
    ppo = PPOConfig(kl_coef=0.1, gamma=1.0, lam=1.0, non_eos_penalty=-10.0, whiten_advantages=False)
    out, stats = with_advantages(b, ppo)
    # row 0: k1 = [0.5, 0, 0] -> rewards [-0.05, 0, 1]; row 1 did not end with EOS -> score -10 at its only token
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.05, 0.0, 1.0], [-10.0, 0.0, 0.0]]))
    # gamma = lam = 1 and zero values: advantage = reward-to-go
    torch.testing.assert_close(out.advantages, torch.tensor([[0.95, 1.0, 1.0], [-10.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.returns, out.advantages)
    assert stats["kl/mean"] == pytest.approx(0.25) and stats["score/mean"] == pytest.approx(1.5)
    assert stats["reward/mean"] == pytest.approx((0.95 - 10.0) / 2)
    assert stats["response/eos_fraction"] == 0.5 and stats["response/length_mean"] == 2.0


def test_values_do_not_depend_on_padding_and_read_the_state_before_each_token(tiny_cache):
    from rlhf_ray.models.modeling import load_value_model
    from rlhf_ray.models.specs import resolve_model

    critic = load_value_model("reward", resolve_model("tiny:policy", tiny_cache),
                              resolve_model("tiny:reward", tiny_cache), "float32").eval()
    long, short = make_batch([[7, 8, 9, 10, 11]], [[12, 13, 14, 15]]), make_batch([[20]], [[21, 22]])
    with torch.no_grad():
        together = critic(RolloutBatch.concat([long, short]))
        alone = [critic(b)[0] for b in (long, short)]
        # V(s_t) for response token t is the head on the hidden state of the token before it
        hidden = critic.backbone(input_ids=torch.tensor([[20, 21, 22]])).last_hidden_state[0, :2]
        manual = critic.head(hidden).squeeze(-1)
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1, :2], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1], manual, atol=1e-5, rtol=0)


def test_response_logprobs_do_not_depend_on_padding(tiny_cache):
    """A row scored inside a padded batch gets the same logprobs as scored alone (positions, masks)."""
    from rlhf_ray.models.modeling import batched_response_logprobs, load_causal_lm
    from rlhf_ray.models.specs import resolve_model

    model = load_causal_lm(resolve_model("tiny:policy", tiny_cache)).eval()
    long, short = make_batch([[7, 8, 9, 10, 11]], [[12, 13, 14, 15]]), make_batch([[20]], [[21, 22]])
    both = RolloutBatch.concat([long, short])
    together = batched_response_logprobs(model, both, micro_batch_size=2)
    alone = [batched_response_logprobs(model, b, micro_batch_size=1)[0] for b in (long, short)]
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1, :2], alone[1], atol=1e-5, rtol=0)
    assert together[1, 2:].abs().sum() == 0  # padding positions are zeroed
    manual = torch.log_softmax(model(torch.tensor([[20, 21, 22]])).logits[0, :2], -1)
    torch.testing.assert_close(alone[1], manual.gather(-1, torch.tensor([[21], [22]])).squeeze(-1), atol=1e-5, rtol=0)
