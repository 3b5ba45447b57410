"""SFT conversations: which tokens are in the loss for each chat template, truncation, skip counts, packing."""
from __future__ import annotations

import json
import logging
import random
from collections import Counter

import pytest
import torch

from rlhf_ray.data.conversations import (EncodedConversation, encode_for_sft, first_fit, load_sft_conversations, pack,
                                         packed_attention_mask)
from tests.conftest import shared_file

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}]

# Llama-3's own chat template (BOS written by the template, each turn closed by <|eot_id|>)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# drops the reasoning of earlier answers, as reasoning models' templates do: earlier turns change once more follow
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_file(f"tokenizers/{name}/tokenizer.json").parent)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def llama3():
    """SmolLM2's vocabulary with Llama-3's special tokens, chat template and BOS-adding tokenizer (no download)."""
    from tokenizers import processors

    tok = load_tokenizer("smollm2-135m-instruct")
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens":
                            ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    # like Llama-3's tokenizer, it adds a BOS when asked for special tokens, though its template writes one too
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def runs(tokenizer, encoded: EncodedConversation, in_loss: bool = True) -> list[str]:
    """Decoded maximal runs of consecutive tokens in (or out of) the loss."""
    out, current = [], []
    for token, mask in zip(encoded.input_ids, encoded.loss_mask):
        if bool(mask) == in_loss:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    return out + ([tokenizer.decode(current)] if current else [])


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------- masking

def test_tulu_loss_covers_the_assistant_turns_and_their_eos(gpt2):
    encoded = encode_for_sft(gpt2, CONVERSATION, "tulu", max_length=512)
    assert runs(gpt2, encoded) == ["Hello there!<|endoftext|>\n", "It is 4.<|endoftext|>\n"]
    assert runs(gpt2, encoded, in_loss=False) == ["<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n",
                                                  "<|user|>\nWhat is 2+2?\n<|assistant|>\n"]
    assert not encoded.truncated and len(encoded.loss_mask) == len(encoded.input_ids)


def test_chatml_loss_covers_the_assistant_turns_and_im_end(smollm2):
    encoded = encode_for_sft(smollm2, CONVERSATION, "tokenizer", max_length=512)
    assert runs(smollm2, encoded) == ["Hello there!<|im_end|>\n", "It is 4.<|im_end|>\n"]
    assert runs(smollm2, encoded, in_loss=False) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def test_chatml_default_system_prompt_stays_out_of_the_loss(smollm2):
    """SmolLM2's template writes a default system prompt when the conversation has none."""
    encoded = encode_for_sft(smollm2, CONVERSATION[1:3], "tokenizer", max_length=512)
    assert runs(smollm2, encoded) == ["Hello there!<|im_end|>\n"]
    assert "You are a helpful AI assistant named SmolLM" in runs(smollm2, encoded, in_loss=False)[0]


def test_llama3_loss_covers_the_assistant_turns_and_eot(llama3):
    encoded = encode_for_sft(llama3, CONVERSATION, "tokenizer", max_length=512)
    assert runs(llama3, encoded) == ["Hello there!<|eot_id|>", "It is 4.<|eot_id|>"]
    second_prompt = ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert runs(llama3, encoded, in_loss=False)[1] == second_prompt
    # the template writes the BOS: the tokenizer must not add a second one
    assert encoded.input_ids.count(llama3.bos_token_id) == 1 and encoded.input_ids[0] == llama3.bos_token_id


def test_a_template_that_rewrites_earlier_turns_is_refused(smollm2):
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.chat_template = REWRITING_TEMPLATE
    single = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]
    assert runs(tok, encode_for_sft(tok, single, "tokenizer", 512)) == ["<think>add</think>4<|im_end|>\n"]
    two_turns = [*single, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>add</think>6"}]
    with pytest.raises(ValueError, match="chat template of .*smollm2.*rewrites earlier turns"):
        encode_for_sft(tok, two_turns, "tokenizer", 512)


def test_encode_refuses_what_it_cannot_mask(gpt2):
    class SlowTokenizer:
        is_fast = False
        eos_token = "</s>"

    with pytest.raises(ValueError, match="slow tokenizer"):
        encode_for_sft(SlowTokenizer(), CONVERSATION, "tulu", 512)
    with pytest.raises(ValueError, match="template='chatml'"):
        encode_for_sft(gpt2, CONVERSATION, "chatml", 512)
    with pytest.raises(ValueError, match="does_not_end_with_assistant_turn"):
        encode_for_sft(gpt2, CONVERSATION[:4], "tulu", 512)


# -------------------------------------------------------------------------------------- truncation

def test_truncation_keeps_the_first_tokens_and_their_mask(gpt2):
    full = encode_for_sft(gpt2, CONVERSATION, "tulu", max_length=512)
    assert not encode_for_sft(gpt2, CONVERSATION, "tulu", max_length=len(full.input_ids)).truncated
    second_answer = len(full.input_ids) - 3  # keeps "It is 4" of "It is 4.<|endoftext|>\n"
    cut = encode_for_sft(gpt2, CONVERSATION, "tulu", max_length=second_answer)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:second_answer] and cut.loss_mask == full.loss_mask[:second_answer]
    assert runs(gpt2, cut) == ["Hello there!<|endoftext|>\n", "It is 4"]
    first_answer = full.loss_mask.index(1)
    assert not any(encode_for_sft(gpt2, CONVERSATION, "tulu", max_length=first_answer).loss_mask)


# ----------------------------------------------------------------------------------------- loading

def test_unusable_rows_are_skipped_and_counted(tmp_path, gpt2, caplog):
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": CONVERSATION[:3]},
        {"messages": [user, {"role": "assistant", "content": "word " * 60}]},  # kept, truncated inside the answer
        {"messages": [{"role": "user", "content": "word " * 60}, answer]},  # truncated before the answer
        "{broken",
        "[1, 2]",
        {"other": 1},
        {"messages": "Hi"},
        {"messages": [{"role": "bot", "content": "Hi"}, answer]},
        {"messages": [user, {"role": "assistant", "content": "  "}]},
        {"messages": [user]},
        {"messages": [user, answer, user]},
        {"messages": [answer, user, answer]},
    ])
    with caplog.at_level(logging.INFO, logger="rlhf_ray.data.conversations"):
        data = load_sft_conversations(path, "train", "tulu", gpt2, max_length=40)
    assert data.skipped == Counter(nothing_to_learn_after_truncation=1, malformed_json=1, not_an_object=1,
                                   missing_messages=1, empty_or_not_a_list=1, malformed_message=1, empty_content=1,
                                   no_assistant_turn=1, does_not_end_with_assistant_turn=1,
                                   assistant_turn_before_any_user_turn=1)
    assert (len(data), data.total_rows, data.truncated) == (2, 12, 1)
    assert [r.truncated for r in data.rows] == [False, True] and len(data.rows[1].input_ids) == 40
    warnings = [r for r in caplog.records if r.name == "rlhf_ray.data.conversations" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no_assistant_turn=1" in warnings[0].getMessage()


def test_data_with_nothing_usable_is_an_error(tmp_path, gpt2):
    user = {"role": "user", "content": "Hi"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [user]}, {"messages": [user]}])
    with pytest.raises(ValueError, match="no usable SFT conversation.*from 2 rows; skipped: no_assistant_turn=2"):
        load_sft_conversations(path, "train", "tulu", gpt2, max_length=64)
    path = write_jsonl(tmp_path / "other.jsonl", [{"conversation": CONVERSATION}])
    with pytest.raises(ValueError, match="messages_field='messages' is not a column.*conversation"):
        load_sft_conversations(path, "train", "tulu", gpt2, max_length=64)
    assert len(load_sft_conversations(path, "train", "tulu", gpt2, 64, messages_field="conversation")) == 1


# ----------------------------------------------------------------------------------------- packing

def conversation(start: int, length: int) -> EncodedConversation:
    """Distinct token ids start.. so that every token can be traced; loss on the odd ones."""
    ids = list(range(start, start + length))
    return EncodedConversation(ids, [i % 2 for i in ids])


def test_pack_is_first_fit_with_restarting_positions():
    rows = [conversation(100 * i, n) for i, n in enumerate([5, 4, 3, 2, 6])]
    packs = pack(rows, max_length=8)
    assert [p.sequence_lengths for p in packs] == [[5, 3], [4, 2], [6]]
    assert packs[0].input_ids == rows[0].input_ids + rows[2].input_ids
    assert packs[0].loss_mask == rows[0].loss_mask + rows[2].loss_mask
    assert packs[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert packs[2].position_ids == list(range(6))
    packed = sorted(t for p in packs for t in p.input_ids)
    assert packed == sorted(t for r in rows for t in r.input_ids)  # no token lost or repeated
    with pytest.raises(ValueError, match="outside \\[1, 5\\]"):
        pack(rows, max_length=5)


def test_first_fit_matches_the_plain_quadratic_algorithm():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    room, expected = [], []
    for n in lengths:
        index = next((i for i, r in enumerate(room) if r >= n), len(room))
        if index == len(room):
            room.append(50)
        room[index] -= n
        expected.append(index)
    assert first_fit(lengths, 50) == expected


def test_packed_attention_mask_is_block_diagonal_causal():
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # last: padding, attending to itself
    mask = packed_attention_mask([2, 3], 6)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    with pytest.raises(ValueError):
        packed_attention_mask([4, 3], 6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_reads_like_its_conversations_apart(attn):
    """What packed_attention_mask documents: a Hugging Face model gives each packed conversation the logits it
    gives that conversation alone, with the 4D mask or with position_ids alone (use_cache=False)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation=attn)).eval()
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 3))
    packed = pack([EncodedConversation(a[0].tolist(), [1] * 5), EncodedConversation(b[0].tolist(), [1] * 3)], 8)[0]
    ids, positions = torch.tensor([packed.input_ids]), torch.tensor([packed.position_ids])
    mask = packed_attention_mask(packed.sequence_lengths, 8)[None, None]
    if attn == "eager":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        apart = torch.cat([model(a).logits, model(b).logits], dim=1)
        with_mask = model(ids, position_ids=positions, attention_mask=mask).logits
        with_positions = model(ids, position_ids=positions, use_cache=False).logits
        plain = model(ids).logits
    torch.testing.assert_close(with_mask, apart)
    torch.testing.assert_close(with_positions, apart)
    assert not torch.allclose(plain[:, 5:], apart[:, 5:], atol=1e-3)  # without either, b reads a
