"""The verifiable arithmetic task: its problems, the answer parser and reward, and labels reaching the reward."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.actors.reward import RewardActor
from rlhf_ray.config import DataConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.sources import load_prompts
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.tasks import arithmetic
from rlhf_ray.tasks.arithmetic import final_answer, problems, reward
from tests.conftest import ROOT


@pytest.mark.parametrize("response, expected", [
    ("48 + 37 = 85\nAnswer: 85", (85, True)),
    ("The answer is: **1,024**.", (1024, True)),
    ("answer = -3", (-3, True)),
    ("Answer: 12\nWait, no. Answer: 13", (13, True)),       # the last one counts
    ("She has 4 + 18 = 22 cards.", (22, False)),           # no Answer line: the last number
    ("I don't know.", (None, False)),
])
def test_the_final_answer_is_parsed_from_the_answer_line_or_the_last_number(response, expected):
    assert final_answer(response) == expected


def test_reward_scores_correctness_and_format():
    assert reward("", "4 + 18 = 22\nAnswer: 22", label="22") == pytest.approx(1.0)
    assert reward("", "4 + 18 = 22", label="22") == pytest.approx(0.9)
    assert reward("", "Answer: 21", label="22") == pytest.approx(0.1)
    assert reward("", "twenty-two", label="22") == 0.0
    assert reward("", "Answer: 22", label="22", format_bonus=0.0) == 1.0
    with pytest.raises(ValueError, match="data.label_field"):
        reward("", "Answer: 22")


def test_problems_are_seeded_exact_and_the_shipped_test_set_is_disjoint_from_train(tmp_path):
    rows = problems(200, seed=3)
    assert rows == problems(200, seed=3) != problems(200, seed=4)
    for row in rows:  # every answer is the question's own arithmetic
        question = row["messages"][0]["content"]
        if row["kind"] in ("add", "sub", "mul"):
            a, op, b = question.removeprefix("What is ").split("?")[0].split()
            assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
    train, test = (ROOT / "configs" / "data" / f"arithmetic_{s}.jsonl" for s in ("train", "test"))
    shipped = {s: [json.loads(line) for line in p.open()] for s, p in (("train", train), ("test", test))}
    assert shipped["train"] == problems(512, 0, exclude={r["messages"][0]["content"] for r in shipped["test"]})
    assert not {r["messages"][0]["content"] for r in shipped["train"]} & {r["messages"][0]["content"]
                                                                         for r in shipped["test"]}
    written = arithmetic.write(tmp_path, 512, 128, 0, 50)  # the module's command makes the shipped files again
    assert [p.read_text() for p in written] == [train.read_text(), test.read_text()]
    with pytest.raises(ValueError, match="only .* distinct problems"):
        problems(1000, 0, max_operand=3, kinds=("add",))


def test_labels_travel_from_the_data_to_the_reward_function(tmp_path, tiny_tokenizer):
    path = tmp_path / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": 4},
            {"messages": [{"role": "user", "content": "What is 3 + 3?"}]},                  # no answer: skipped
            {"messages": [{"role": "user", "content": "What is 5 + 5?"}], "answer": "10"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_prompts(DataConfig(prompts=str(path), label_field="answer"), tiny_tokenizer)
    assert [p.label for p in data.prompts] == ["4", "10"] and data.skipped == {"no_label": 1}
    with pytest.raises(ValueError, match="data.label_field='solution' is not a column"):
        load_prompts(DataConfig(prompts=str(path), label_field="solution"), tiny_tokenizer)

    batch = RolloutBatch.from_samples([p.token_ids for p in data.prompts], [[1], [1]], [[0.0], [0.0]], ["stop"] * 2,
                                      [p.messages for p in data.prompts], [p.text for p in data.prompts],
                                      ["Answer: 4", "Answer: 11"], 0, labels=[p.label for p in data.prompts])
    assert batch.select([1]).labels == ["10"] and RolloutBatch.concat([batch, batch]).labels == ["4", "10"] * 2
    actor = RewardActor({"kind": "function", "function": "rlhf_ray.tasks.arithmetic:reward"}, None)
    scores, _ = actor.score(batch)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.1]))
    # a remote verifier gets the label in the v1 request; samples without one do not carry the key
    assert RewardSample.of([], "p", "r", "4").to_json()["label"] == "4" and "label" not in RewardSample.of(
        [], "p", "r").to_json()
