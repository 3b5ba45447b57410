"""Padding-free and chunked-logits forward passes (rlhf_ray.models.forward) equal the plain padded, full-logits ones:
values and gradients, over several architectures, and fall back with a warning where a model breaks them."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers as T
from architectures import ARCHITECTURES, build

from rlhf_ray.data.batch import RolloutBatch, SequenceBatch
from rlhf_ray.models.forward import ForwardOptions, response_token_stats
from rlhf_ray.models.modeling import PolicyAndValue, ValueModel

PLAIN = ForwardOptions(padding_free=False, logits_chunk_tokens=0)
FAST = ForwardOptions(padding_free=True, logits_chunk_tokens=3)   # chunks smaller than one response: several per row
EXTRA = {  # architectures beyond weight sync's: learned absolute positions (GPT-2), a soft-capped head (Gemma 2)
    "gpt2": lambda vocab: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=128)),
    "gemma2": lambda vocab: T.Gemma2ForCausalLM(T.Gemma2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.5)),   # a cap that binds on random logits
}


def rollout(rows: list[tuple[int, int]], vocab: int = 1000, seed: int = 0) -> RolloutBatch:
    """A padded batch with the given (prompt, response) lengths; a response may be empty."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(p) for p, _ in rows], [ids(r) for _, r in rows]
    return RolloutBatch.from_samples(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * len(rows),
                                     [[]] * len(rows), [""] * len(rows), [""] * len(rows), pad_token_id=0)


ROWS = [(8, 4), (5, 4), (1, 7), (3, 0), (2, 1), (1, 2)]  # lengths 12, 9, 8, 3, 3, 3: packed into 4 rows of 12


def test_short_sequences_share_packed_rows_no_wider_than_the_longest():
    from rlhf_ray.models.forward import pack_sequences, packed_layout

    lengths = [p + r for p, r in ROWS]
    rows, width = pack_sequences(lengths)
    assert width == 12 and rows == [[0], [1, 3], [2, 4], [5]]
    assert pack_sequences(lengths, 24) == ([[0, 1, 3], [2, 4, 5]], 24)
    # where attention is cheap, wider rows waste less; where it is dear, rows stay as wide as the longest sequence
    assert packed_layout(lengths, attention_width=1e6) == ([[0, 1, 2, 3, 4, 5]], 38)
    assert packed_layout(lengths, attention_width=1.0) == (rows, 12)


def model_named(name: str, tiny_tokenizer) -> torch.nn.Module:
    if name in EXTRA:
        torch.manual_seed(0)
        return EXTRA[name](len(tiny_tokenizer)).eval()
    return build(name, tiny_tokenizer)


def stats_and_grads(model, batch, options, temperature=0.7):
    model.zero_grad()
    logprobs, entropy = response_token_stats(model, batch, temperature, entropy=True, options=options,
                                             entropy_grad=True)
    ((logprobs * torch.linspace(0.5, 1.5, logprobs.numel()).view_as(logprobs)).sum() + 0.3 * entropy.sum()).backward()
    return logprobs.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}


@pytest.mark.parametrize("name", [*ARCHITECTURES, *EXTRA])
def test_packed_chunked_equal_padded_full(name, tiny_tokenizer):
    """Log-probs, entropies and every parameter's gradient agree (fp32, tight tolerance) between the plain forward
    and the packed + chunked one, over rows of mixed prompt/response lengths including an empty response."""
    model = model_named(name, tiny_tokenizer)
    assert FAST.checked(model, name) == FAST  # the model passes its own load-time check
    batch = rollout(ROWS, vocab=model.config.vocab_size)
    lp0, h0, g0 = stats_and_grads(model, batch, PLAIN)
    lp1, h1, g1 = stats_and_grads(model, batch, FAST)
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-5)
    assert (lp1 * (1 - batch.response_mask)).abs().sum() == 0  # padding stays 0
    assert g0.keys() == g1.keys() and len(g0) > 0
    for key in g0:
        torch.testing.assert_close(g1[key], g0[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("options", [ForwardOptions(True, 0), ForwardOptions(False, 2), ForwardOptions(True, None)])
def test_each_option_alone_equals_plain(options, tiny_tokenizer):
    model = build("llama-tied", tiny_tokenizer)
    batch = rollout(ROWS, vocab=model.config.vocab_size, seed=1)
    lp0, h0, g0 = stats_and_grads(model, batch, PLAIN)
    lp1, h1, g1 = stats_and_grads(model, batch, options)
    torch.testing.assert_close(lp1, lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-5)
    for key in g0:
        torch.testing.assert_close(g1[key], g0[key], atol=1e-5, rtol=1e-4)


def test_value_model_packed_equals_padded(tiny_tokenizer):
    lm = build("llama", tiny_tokenizer)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    batch = rollout(ROWS, vocab=lm.config.vocab_size, seed=2)
    padded, packed = ValueModel(lm.base_model, head, False)(batch), ValueModel(lm.base_model, head, True)(batch)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
    assert (packed * (1 - batch.response_mask)).abs().sum() == 0


def test_policy_and_value_module_returns_logprobs_entropy_values(tiny_tokenizer):
    lm = build("llama-tied", tiny_tokenizer)
    value = ValueModel(build("llama", tiny_tokenizer).base_model, torch.nn.Linear(128, 1), True)
    batch = rollout(ROWS, vocab=lm.config.vocab_size, seed=3)
    logprobs, entropy, values = PolicyAndValue(lm, value, FAST)(batch, temperature=1.0, entropy=True)
    expected, expected_entropy = response_token_stats(lm, batch, entropy=True, options=PLAIN)
    torch.testing.assert_close(logprobs, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=2e-5, rtol=1e-5)  # the metric, as computed in grad mode
    logprobs.sum().backward()  # a metric entropy is not recomputed in backward, and the backward still works
    assert entropy.shape == values.shape == batch.response_mask.shape
    assert not entropy.requires_grad  # a metric unless entropy_grad
    assert PolicyAndValue(lm, None, FAST)(batch)[1:] == (None, None)


class IgnoresPositions(torch.nn.Module):
    """A backbone that drops position ids (positions from 0 across the whole row): packing cannot work on it."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.config = backbone.config

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_a_model_that_breaks_packing_or_chunking_falls_back_with_a_warning(tiny_tokenizer, caplog):
    backbone = IgnoresPositions(build("llama", tiny_tokenizer).base_model).eval()
    with caplog.at_level(logging.WARNING):
        assert FAST.checked(backbone, "odd-backbone") == ForwardOptions(False, 3)
    assert "odd-backbone does not keep packed sequences apart" in caplog.text

    model = build("llama", tiny_tokenizer)
    plain_forward = model.forward
    model.forward = lambda *a, **k: T.modeling_outputs.CausalLMOutputWithPast(  # a transform after the head
        logits=plain_forward(*a, **k).logits * 2.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert FAST.checked(model, "odd-head") == ForwardOptions(True, 0)
    assert "odd-head's logits are not its LM head's output" in caplog.text
    assert model.training is False  # the check leaves the mode as it found it


def test_chunked_sft_nll_equals_full_logits(tiny_tokenizer):
    """The SFT loss's per-token NLL and gradients are the same with the LM head chunked over learned tokens."""
    from rlhf_ray.objectives.sft import token_nll

    model = build("qwen2-tied", tiny_tokenizer)
    g = torch.Generator().manual_seed(4)
    rows = []
    for lengths in ([6, 4], [9], [3, 2, 2]):  # packed rows of several conversations
        ids = torch.randint(3, model.config.vocab_size, (sum(lengths),), generator=g).tolist()
        mask = (torch.rand(len(ids), generator=g) > 0.3).float().tolist()
        rows.append((ids, mask, lengths))
    batch = SequenceBatch.from_rows(rows, pad_token_id=0)
    results = []
    for options in (ForwardOptions(False, 0), ForwardOptions(False, 2)):
        model.zero_grad()
        nll = token_nll(model, batch, options)
        nll.sum().backward()
        results.append((nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-5)
    assert (results[1][0] * (1 - batch.loss_mask[:, 1:])).abs().sum() == 0
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, atol=1e-5, rtol=1e-4)


def test_chunking_bounds_the_logits_memory(tiny_tokenizer):
    """The largest tensor the head path allocates is one chunk of logits, not the micro-batch's [B, R, V]."""
    model = build("llama-tied", tiny_tokenizer)
    batch = rollout([(4, 40)] * 6, vocab=model.config.vocab_size, seed=5)

    def peak_logits_elements(options):
        largest = [0]

        def record(module, inputs, output):
            largest[0] = max(largest[0], output.numel())
        handle = model.get_output_embeddings().register_forward_hook(record)
        try:
            logprobs, _ = response_token_stats(model, batch, entropy=True, options=options, entropy_grad=True)
            logprobs.sum().backward()
        finally:
            handle.remove()
        return largest[0]

    vocab = model.config.vocab_size
    assert peak_logits_elements(ForwardOptions(True, 16)) == 16 * vocab
    assert peak_logits_elements(PLAIN) == 6 * 41 * vocab


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_reward_model_scores_packed_equal_its_own_forward(name):
    """A sequence classifier's packed scores (only the pooled token through the head) equal its HF forward's, which
    pools at the rightmost non-pad token — here the pad token is also EOS and ends some rows, as with many RMs."""
    from rlhf_ray.models.forward import sequence_scores

    torch.manual_seed(0)
    pad = 2
    model = {
        "llama": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=1, pad_token_id=pad)),
        "qwen2": lambda: T.Qwen2ForSequenceClassification(T.Qwen2Config(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=1, pad_token_id=pad)),
        "gpt2": lambda: T.GPT2ForSequenceClassification(T.GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, num_labels=1, pad_token_id=pad)),
    }[name]().eval()
    assert FAST.checked(model, name).padding_free
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 300, (n,), generator=g) for n in (9, 3, 6, 1)]
    rows[0][-1] = rows[2][-1] = pad  # ends with EOS == pad: pooled at the token before it, as HF does
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        for padding_free in (False, True):
            torch.testing.assert_close(sequence_scores(model, ids, mask, padding_free), expected, atol=2e-5, rtol=1e-5)


def test_token_budget_groups_are_few_even_and_complete():
    from rlhf_ray.data.batch import token_budget_groups

    assert token_budget_groups([10, 20, 30, 40, 5], 50) == [[3], [2, 4], [0, 1]]
    assert token_budget_groups([100, 3, 3], 50) == [[0], [1, 2]]   # an over-long row alone, the rest together
    assert token_budget_groups([10] * 8, 35) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert token_budget_groups([7], 1) == [[0]] and token_budget_groups([], 10) == []
    assert len(token_budget_groups([10, 20, 30, 40, 5], 50, count=4)) == 4   # a count the other ranks need
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        tokens = torch.randint(1, 60, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        budget = int(torch.randint(20, 120, (1,), generator=g))
        groups = token_budget_groups(tokens, budget)
        assert sorted(i for grp in groups for i in grp) == list(range(len(tokens)))
        assert all(len(grp) == 1 or sum(tokens[i] for i in grp) <= budget for grp in groups)
        assert len(groups) >= -(-sum(min(t, budget) for t in tokens) // budget)


def test_ppo_gradients_do_not_depend_on_how_rows_are_grouped_into_micro_batches(tiny_tokenizer):
    """The learner may group a mini-batch's rows by rows or by tokens: each micro-batch's loss is its share of the
    mini-batch mean, so the accumulated gradient is the same."""
    from rlhf_ray.config import DeepSpeedConfig, OptimizerConfig, PPOConfig
    from rlhf_ray.data.batch import token_budget_groups
    from rlhf_ray.objectives import LearnerSpec, make_objective
    from rlhf_ray.objectives.ppo import PPOOptions

    spec = LearnerSpec(objective="ppo", model="unused", mini_batch_size=5, micro_batch_size=5, optimizer_steps=1,
                       optimizer=OptimizerConfig(), deepspeed=DeepSpeedConfig(zero_stage=0),
                       options=PPOOptions(critic=False, ppo=PPOConfig(advantage="grpo", loss_aggregation="token_mean")))
    objective = make_objective(spec)
    module = PolicyAndValue(build("llama-tied", tiny_tokenizer), None, FAST)
    batch = rollout(ROWS[:5], vocab=module.policy.config.vocab_size, seed=7)
    g = torch.Generator().manual_seed(8)
    batch = batch.with_(old_logprobs=-torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask,
                        ref_logprobs=-torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask,
                        advantages=torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask)
    units = float(objective.units(batch))
    grads = []
    for groups in ([list(range(5))], token_budget_groups(batch.row_tokens().tolist(), 12)):
        assert len(groups) == 1 or len(groups) > 2
        module.zero_grad()
        for rows in groups:
            objective.loss(module, batch.select(rows), units)[0].backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-4)
