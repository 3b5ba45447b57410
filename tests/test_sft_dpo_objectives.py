"""The SFT and DPO objectives on a tiny model, without Ray: the losses equal their formulas computed by hand from the
model's own outputs, packing changes nothing, a pair stays together, and DPO's data keeps each response's tokens
exactly as the template renders them."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.data.batch import ResponsePairBatch, SequenceBatch
from rlhf_ray.objectives.dpo import DPOOptions
from rlhf_ray.objectives.sft import SFTOptions
from tests.test_lora import as_if_trained


@pytest.fixture(scope="module")
def tiny_policy(tiny_cache):
    from rlhf_ray.models.modeling import load_causal_lm
    from rlhf_ray.models.specs import resolve_model

    path = resolve_model("tiny:policy", tiny_cache)
    return path, load_causal_lm(path).eval()


def spec(path, objective, **extra):
    from rlhf_ray.config import DeepSpeedConfig, OptimizerConfig
    from rlhf_ray.objectives import LearnerSpec

    if objective == "sft" and "options" not in extra:
        extra["options"] = SFTOptions()

    return LearnerSpec(objective=objective, model=path, mini_batch_size=4, micro_batch_size=2, optimizer_steps=1,
                       optimizer=OptimizerConfig(), deepspeed=DeepSpeedConfig(zero_stage=0), **extra)


def by_hand_nll(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Σ −log p over the masked tokens of one sequence alone, and their count."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    terms = [-float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
    return sum(terms), len(terms)


SEQUENCES = [(list(range(5, 17)), [0] * 6 + [1] * 6), (list(range(30, 39)), [0] * 3 + [1] * 6),
             (list(range(40, 47)), [0] * 2 + [1] * 5), (list(range(60, 75)), [0] * 10 + [1] * 5)]


@pytest.mark.parametrize("loss_mean", ["token", "sequence"])
def test_the_sft_loss_is_the_mean_nll_of_the_learned_tokens_packed_or_not(tiny_policy, loss_mean):
    from rlhf_ray.objectives import make_objective

    path, model = tiny_policy
    objective = make_objective(spec(path, "sft", options=SFTOptions(loss_mean=loss_mean)))
    module = objective.build().eval()  # what the learner trains: the policy with its chunked LM head
    by_hand = [by_hand_nll(model, ids, mask) for ids, mask in SEQUENCES]
    expected = (sum(n for n, _ in by_hand) / sum(c for _, c in by_hand) if loss_mean == "token"
                else sum(n / c for n, c in by_hand) / len(by_hand))
    rows = SequenceBatch.from_rows([(ids, mask, [len(ids)]) for ids, mask in SEQUENCES], pad_token_id=0)
    packed = SequenceBatch.from_rows([(SEQUENCES[0][0] + SEQUENCES[1][0], SEQUENCES[0][1] + SEQUENCES[1][1], [12, 9]),
                                      (SEQUENCES[2][0] + SEQUENCES[3][0], SEQUENCES[2][1] + SEQUENCES[3][1], [7, 15])],
                                     pad_token_id=0)
    assert packed.packed and not rows.packed
    for batch in (rows, packed):
        units = float(objective.units(batch))
        with torch.no_grad():
            # two micro-batches of the mini-batch: their shares add up to the mean over all of it
            loss = sum(objective.loss(module, micro, units)[0] for micro in batch.chunks(2))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    sums = objective.evaluate(module, rows)
    assert sums[:, 0].tolist() == pytest.approx([n for n, _ in by_hand], rel=1e-5)
    assert sums[:, 1].tolist() == [c for _, c in by_hand]


def pair_batch():
    prompts = [[5, 6, 7], [8, 9]]
    chosen, rejected = [[10, 11, 12], [13, 14]], [[15], [16, 17, 18, 19]]
    return prompts, chosen, rejected, ResponsePairBatch.from_encoded(prompts, chosen, rejected, ["a", "b"], 0)


def test_a_response_pair_batch_keeps_each_pair_together():
    prompts, chosen, rejected, batch = pair_batch()
    assert batch.response_tokens.tolist() == [[3, 1], [2, 4]]
    flipped = batch.select([1, 0])
    assert flipped.sources == ["b", "a"] and flipped.response_tokens.tolist() == [[2, 4], [3, 1]]
    sides = batch.sides()
    assert len(sides) == 4
    for row, (p, r) in enumerate([(prompts[0], chosen[0]), (prompts[0], rejected[0]), (prompts[1], chosen[1]),
                                  (prompts[1], rejected[1])]):
        ids = sides.input_ids[row][sides.attention_mask[row].bool()].tolist()
        assert ids == p + r


def test_the_dpo_loss_is_its_formula_on_the_policys_own_logprobs(tiny_policy):
    from rlhf_ray.config import DPOTrainingConfig
    from rlhf_ray.objectives import make_objective

    path, model = tiny_policy
    prompts, chosen, rejected, batch = pair_batch()
    logps = [[by_hand_nll(model, p + r, [0] * len(p) + [1] * len(r))[0] * -1 for r in (c, rj)]
             for p, c, rj in zip(prompts, chosen, rejected)]
    ref = torch.tensor([[-20.0, -5.0], [-9.0, -30.0]])
    objective = make_objective(spec(path, "dpo", options=DPOOptions(dpo=DPOTrainingConfig(loss="sigmoid", beta=0.5))))
    model = objective.build().eval()  # what the learner trains: the policy, packed, with its chunked LM head
    assert objective.evaluate(model, batch).flatten().tolist() == pytest.approx(sum(logps, []), rel=1e-5)
    with torch.no_grad():
        loss, stats = objective.loss(model, batch.with_(ref_logps=ref), 2.0)
    h = [(lc - rc) - (lr - rr) for (lc, lr), (rc, rr) in zip(logps, ref.tolist())]
    assert float(loss) == pytest.approx(sum(-math.log(1 / (1 + math.exp(-0.5 * x))) for x in h) / 2, rel=1e-5)
    assert stats["dpo/accuracy"] == sum(x > 0 for x in h) / 2
    # the reference itself as the policy: every margin 0, the loss log 2
    with torch.no_grad():
        loss, _ = objective.loss(model, batch.with_(ref_logps=torch.tensor(logps)), 2.0)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="needs the reference's log-probs"):
        objective.loss(model, batch, 2.0)


def test_dpo_pairs_are_the_rendered_prompt_and_each_rendered_assistant_turn(tiny_tokenizer):
    from rlhf_ray.data.sources import PreferencePair, render_messages
    from rlhf_ray.drivers.dpo import encode_response_pairs

    prompt = [{"role": "user", "content": "Name a colour."}]
    pairs = [PreferencePair(prompt, "Blue.", "I will not.", "s")]
    encoded = encode_response_pairs(tiny_tokenizer, pairs, "tulu", max_prompt_length=64, max_length=128)
    assert tiny_tokenizer.decode(encoded.prompts[0], skip_special_tokens=False).endswith(
        render_messages(prompt, "tulu", tiny_tokenizer))
    eos = tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(encoded.chosen[0]) == f"Blue.{eos}\n"
    assert tiny_tokenizer.decode(encoded.rejected[0]) == f"I will not.{eos}\n"
    assert encoded.truncated == 0
    cut = encode_response_pairs(tiny_tokenizer, pairs, "tulu", max_prompt_length=4, max_length=6)
    assert len(cut.prompts[0]) == 4 and cut.prompts[0] == encoded.prompts[0][-4:]   # the prompt keeps its end
    assert cut.chosen[0] == encoded.chosen[0][:2] and cut.truncated == 1            # a response keeps its start


def test_sft_with_lora_trains_the_adapters_alone_from_the_models_own_loss(tiny_policy):
    from rlhf_ray.config import LoRAConfig
    from rlhf_ray.models import lora
    from rlhf_ray.objectives import make_objective

    path, _ = tiny_policy
    rows = SequenceBatch.from_rows([(ids, mask, [len(ids)]) for ids, mask in SEQUENCES], pad_token_id=0)
    full, adapted = (make_objective(spec(path, "sft", lora=lora)) for lora in (None, LoRAConfig(rank=4)))
    plain, module = full.build().eval(), adapted.build().eval()
    units = float(adapted.units(rows))
    with torch.no_grad():  # B = 0: the adapted model starts as the model
        assert float(adapted.loss(module, rows, units)[0]) == pytest.approx(float(full.loss(plain, rows, units)[0]),
                                                                            rel=1e-6)
    adapted.loss(module, rows, units)[0].backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert lora.is_adapted(adapted.exported(module))  # the learner saves it merged, its adapter beside


def test_dpo_with_lora_takes_the_reference_from_the_base_with_its_adapters_off(tiny_policy):
    """What the learner gives rlhf_ray.cluster.roles in place of reference actors: the sides' per-token log-probs of
    the model without its adapters, 0 on padding, however far the adapters have moved."""
    from rlhf_ray.config import DPOTrainingConfig, LoRAConfig
    from rlhf_ray.objectives import make_objective

    path, model = tiny_policy
    prompts, chosen, rejected, batch = pair_batch()
    # one pair a micro-batch: the two sides of each pair in a forward of their own, joined in order
    objective = make_objective(spec(path, "dpo", options=DPOOptions(dpo=DPOTrainingConfig()), lora=LoRAConfig(rank=4)).model_copy(
        update={"micro_batch_size": 1}))
    module = as_if_trained(objective.build().eval(), seed=0)
    sides = batch.sides()
    ref = objective.evaluate(module, sides, reference=True, logprobs=False, values=False)["ref_logprobs"]
    assert ref.shape == sides.response_mask.shape and torch.all(ref[sides.response_mask == 0] == 0)
    by_hand = [-by_hand_nll(model, p + r, [0] * len(p) + [1] * len(r))[0]
               for p, c, rj in zip(prompts, chosen, rejected) for r in (c, rj)]
    assert ref.sum(-1).tolist() == pytest.approx(by_hand, rel=1e-5)
    policy = objective.evaluate(module, batch).flatten()  # adapters on: another policy
    assert (policy - ref.sum(-1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the reference's log-probs alone"):
        objective.evaluate(module, sides, reference=True)  # old log-probs asked as well: not a DPO learner's work
