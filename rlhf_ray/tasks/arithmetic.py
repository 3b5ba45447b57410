"""Arithmetic and word problems with exact integer answers, and the reward that checks them.

Each problem is one user turn ending in the answer format, with its answer in the ``answer`` column::

    {"messages": [{"role": "user", "content": "What is 37 + 48? End with a line 'Answer: <number>'."}],
     "answer": "85", "kind": "add"}

The reward (``models.reward.function: rlhf_ray.tasks.arithmetic:reward`` with ``data.label_field: answer``) reads
the response's final answer — the number after the last "Answer:", else the last number it writes — and scores

    (1 − format_bonus) · [final answer = label]  +  format_bonus · [an "Answer: <number>" line is there]

so 1 is a correct answer in the asked format, 1 − format_bonus a correct one without it, format_bonus a wrong one in
the format, 0 the rest. The shipped files are made by (seeded; the test problems never appear in train)::

    python -m rlhf_ray.tasks.arithmetic --out configs/data --train 512 --test 128 --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

INSTRUCTION = "End with a line 'Answer: <number>'."
ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*\**\s*(-?\d[\d,]*)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*")

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo", "Nia"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]


def _word_add(rng: random.Random, top: int) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, top), rng.randint(2, top)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b


def _word_sub(rng: random.Random, top: int) -> tuple[str, int]:
    name, other, thing = *rng.sample(NAMES, 2), rng.choice(THINGS)
    a = rng.randint(3, top)
    b = rng.randint(1, a - 1)
    return f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?", a - b


def _word_mul(rng: random.Random, top: int) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    boxes, each = rng.randint(2, 9), rng.randint(2, min(top, 12))
    return f"{name} has {boxes} boxes with {each} {thing} in each box. How many {thing} are there in all?", boxes * each


KINDS = {
    "add": lambda rng, top: (lambda a, b: (f"What is {a} + {b}?", a + b))(rng.randint(1, top), rng.randint(1, top)),
    "sub": lambda rng, top: (lambda a, b: (f"What is {max(a, b)} - {min(a, b)}?", abs(a - b)))(
        rng.randint(1, top), rng.randint(1, top)),
    "mul": lambda rng, top: (lambda a, b: (f"What is {a} × {b}?", a * b))(rng.randint(2, 12), rng.randint(2, 12)),
    "word_add": _word_add,
    "word_sub": _word_sub,
    "word_mul": _word_mul,
}


def problems(count: int, seed: int, max_operand: int = 50, kinds: tuple[str, ...] = tuple(KINDS),
             exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` distinct problems (rows as above) drawn from ``seed``, none of whose user turns is in ``exclude``."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown problem kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    rng, rows, seen = random.Random(seed), [], set(exclude)
    for _ in range(count * 100):
        if len(rows) == count:
            break
        kind = rng.choice(kinds)
        question, answer = KINDS[kind](rng, max_operand)
        content = f"{question} {INSTRUCTION}"
        if content in seen:
            continue
        seen.add(content)
        rows.append({"messages": [{"role": "user", "content": content}], "answer": str(answer), "kind": kind})
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} distinct problems of kinds {kinds} with operands up to {max_operand}; "
                         f"asked for {count}")
    return rows


def final_answer(response: str) -> tuple[int | None, bool]:
    """(the response's final answer, whether it came in the asked 'Answer: <number>' form); None when it has no
    number at all."""
    lines = ANSWER_LINE.findall(response)
    if lines:
        return int(lines[-1].replace(",", "")), True
    numbers = NUMBER.findall(response)
    return (int(numbers[-1].replace(",", "")), False) if numbers else (None, False)


def is_correct(response: str, label: str) -> bool:
    return final_answer(response)[0] == int(label)


def reward(prompt: str, response: str, label: str | None = None, format_bonus: float = 0.1) -> float:
    """(1 − format_bonus)·correct + format_bonus·formatted, in [0, 1] (see the module docstring)."""
    if label is None:
        raise ValueError("this reward needs each prompt's answer: set data.label_field (the shipped files: 'answer')")
    value, formatted = final_answer(response)
    return (1 - format_bonus) * float(value == int(label)) + format_bonus * float(formatted)


def write(out: Path, train: int, test: int, seed: int, max_operand: int) -> tuple[Path, Path]:
    """arithmetic_train.jsonl and arithmetic_test.jsonl in ``out``: the test set first, so train avoids it."""
    test_rows = problems(test, seed + 1, max_operand)
    train_rows = problems(train, seed, max_operand, exclude={r["messages"][0]["content"] for r in test_rows})
    paths = []
    for name, rows in (("arithmetic_train.jsonl", train_rows), ("arithmetic_test.jsonl", test_rows)):
        path = Path(out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return tuple(paths)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.tasks.arithmetic",
                                     description="Write seeded arithmetic / word problems with exact answers.")
    parser.add_argument("--out", default="configs/data", help="directory for arithmetic_{train,test}.jsonl")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=50)
    args = parser.parse_args(argv)
    for path in write(Path(args.out), args.train, args.test, args.seed, args.max_operand):
        print(f"wrote {path} ({sum(1 for _ in path.open())} problems)")


if __name__ == "__main__":
    main()
