"""Policy evaluation, AlpacaEval style, judged by a reward model: every policy answers the same held-out prompts
(greedy by default), a reward backend scores each answer, and each policy's win rate against a baseline is the
share of prompts where its score beats the baseline's (a tie counts half).

    python -m rlhf_ray.evaluate --policy sft=real:smollm2-135m --policy ppo=runs/smollm2_cpu \\
        --prompts ../shared/data/starter/prefs_eval_alpacaeval.tulu25.jsonl --limit 50 \\
        --reward model=runs/rm_smollm2_cpu/final_model --out runs/evaluation

A policy is ``NAME=SPEC``; SPEC is a local HF model directory, a hub name, a ``tiny:``/``real:``/``scaled:`` spec
(rlhf_ray.models.specs, built with --seed as PPO builds them), a checkpoint ``<run>/checkpoints/step-N`` (its
``policy/``) or a run directory (its ``final_model/``). Prompt files are .jsonl/.json/.parquet rows with
``messages`` or a ``prompt`` string, or Tulu 2.5 preference rows (the prompt turns of ``chosen``); a ``source``
column splits the report further. The judge is any reward backend PPO uses (rlhf_ray.rewards.backends):
``--reward model=SPEC|function=module:fn|http=URL|serve=APP`` (or rlhf_ray.rm_eval's ``function:module:fn``,
``http://…``, ``serve:APP``, bare model spec), refined with ``--reward-option key=value`` (models.reward keys).
On a verifiable task the judge checks answers against each prompt's label (``--label-field``); its mean score is then
the accuracy, e.g. on the shipped arithmetic test set::

    python -m rlhf_ray.evaluate --policy sft=real:smollm2-135m --policy grpo=runs/grpo_smollm2_cpu \
        --prompts configs/data/arithmetic_test.jsonl --label-field answer --template tokenizer \
        --reward function=rlhf_ray.tasks.arithmetic:reward --reward-option function_kwargs.format_bonus=0

Each policy gets its own vLLM engine in a Ray actor (actors.generation.GenerationActor, the PPO generation
role), one after another; the judge runs in this process, as in rlhf_ray.rm_eval. Writes evaluation.md,
evaluation.json, evaluation.png and responses.jsonl into --out, all at the end; bad inputs exit 2 before
anything starts or is written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlhf_ray.config import RewardConfig

REWARD_FIELDS = {"model": "model", "function": "function", "http": "url", "serve": "app"}  # --reward KIND=VALUE
PROMPT_COLUMNS = ("messages", "prompt", "chosen")


@dataclass
class Policy:
    name: str
    spec: str
    path: str
    prompts: list = field(default_factory=list)  # the engine's prompts (rlhf_ray.data.sources.Prompt) in its tokenizer
    truncated: int = 0                           # how many of them lost their beginning (--max-prompt-tokens)


@dataclass
class EvalPrompt:
    messages: list[dict]
    file: str            # the prompt file's report name (rlhf_ray.data.sources.dataset_name)
    row: int             # the row's position in its file
    source: str | None   # the row's own ``source`` column, if any
    label: str | None = None  # the row's reference answer (--label-field), for a verifying judge

    @property
    def group(self) -> str:
        return f"{self.file}/{self.source}" if self.source is not None else self.file


@dataclass
class PromptFile:
    path: str
    rows: int
    used: int = 0
    skipped: Counter = field(default_factory=Counter)


# ------------------------------------------------------------------------------------------------------ resolve

def resolve_policy(spec: str, cache_dir: str | None, seed: int) -> str:
    """A policy spec -> a directory (or hub name) that vLLM and transformers load; ValueError saying why not."""
    path = model_location(spec, cache_dir, seed)
    config = Path(path) / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(f"{path} is a sequence-classification model (a reward model?), not a policy")
    return path


def model_location(spec: str, cache_dir: str | None, seed: int) -> str:
    """tiny:/real:/scaled: specs built; a model directory as it is; a checkpoint's policy/; a run's final_model/;
    a hub name checked against the local cache or the Hub (rlhf_ray.run.preflight)."""
    from rlhf_ray.run.checkpoint import step_name
    from rlhf_ray.models.specs import BUILDERS, resolve_model
    from rlhf_ray.run.preflight import check_model_path, looks_like_local_path

    if spec.partition(":")[0] in BUILDERS:
        return resolve_model(spec, cache_dir, seed)
    path = Path(spec).expanduser()
    step = re.fullmatch(r"step-(\d+)", path.name)
    if step and not path.exists() and path.parent.is_dir():  # step-12 for step-000012
        path = path.with_name(step_name(int(step[1])))
    if path.is_dir():
        for candidate in (path, path / "policy", path / "final_model"):
            if (candidate / "config.json").is_file():
                return str(candidate)
        steps = sorted((path / "checkpoints").glob("step-*"))
        hint = f"; its latest checkpoint is {steps[-1]}" if steps else ""
        raise ValueError(f"{path} holds no HF model: no config.json in it, in policy/ (a checkpoint) or in "
                         f"final_model/ (a finished run){hint}")
    if path.exists():
        raise ValueError(f"{path} is a file, not a model directory")
    if looks_like_local_path(spec):
        raise ValueError(f"{path} does not exist")
    check_model_path(spec, spec, "model")  # a hub name
    return spec


def parse_policies(items: list[str], cache_dir: str | None, seed: int) -> list[Policy]:
    policies: dict[str, Policy] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--policy {item!r} is not NAME=SPEC")
        if name in policies:
            raise ValueError(f"--policy name {name!r} is given twice")
        try:
            policies[name] = Policy(name, spec, resolve_policy(spec, cache_dir, seed))
        except ValueError as err:  # PreflightError included
            raise ValueError(f"--policy {item}: {err}") from None
    return list(policies.values())


def reward_config(spec: str, options: list[str], template: str) -> RewardConfig:
    """``--reward`` and ``--reward-option``s -> the models.reward config PPO would use for that judge. The RM renders
    conversations with ``template`` unless an option says otherwise."""
    from rlhf_ray.config import ConfigError, build_config, parse_overrides

    kind, sep, value = spec.partition("=")
    if sep and kind in REWARD_FIELDS:
        if not value:
            raise ValueError(f"--reward {spec!r}: give the {REWARD_FIELDS[kind]} after '='")
        fields = {"kind": kind, REWARD_FIELDS[kind]: value}
    else:
        from rlhf_ray.cli.rm_eval import reward_config as rm_eval_reward

        fields = rm_eval_reward(spec, template, 1024, 8).model_dump(include={"kind", *REWARD_FIELDS.values()},
                                                                    exclude_none=True)
    try:
        return build_config({"template": template, **fields, **parse_overrides(options)}, schema=RewardConfig)
    except ConfigError as err:
        given = f"--reward {spec}" + "".join(f" --reward-option {option}" for option in options)
        raise ValueError(f"{given}: {str(err).removeprefix('invalid config: ')}") from None


def build_judge(cfg: RewardConfig, cache_dir: str | None, seed: int):
    from rlhf_ray.rewards.backends import build_backend

    model_path = None
    if cfg.kind == "model":
        try:
            model_path = model_location(cfg.model, cache_dir, seed)
        except ValueError as err:
            raise ValueError(f"--reward model={cfg.model}: {err}") from None
    return build_backend(cfg, model_path=model_path)


# -------------------------------------------------------------------------------------------------- load prompts

def prompt_turns(row: dict) -> list[dict] | str:
    """The prompt of a row (``messages``, a ``prompt`` string, or a preference row's ``chosen`` without its answer),
    ending with a user turn; else the reason to skip it."""
    from rlhf_ray.data.sources import validate_messages

    value = row.get("messages", row.get("prompt", row.get("chosen")))
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    reason = validate_messages(messages)
    if reason:
        return reason
    if messages[-1]["role"] == "assistant":  # a preference or SFT row: its answer is not part of the prompt
        messages = messages[:-1]
    return messages if messages and messages[-1]["role"] == "user" else "does_not_end_with_user_turn"


def load_eval_prompts(paths: list[str], limit: int | None,
                      label_field: str | None = None) -> tuple[list[EvalPrompt], dict[str, PromptFile]]:
    """Every usable prompt of every file (the first ``limit`` of each), skips counted by reason; with ``label_field``
    each keeps that column as its reference answer (a row without one is skipped: 'no_label')."""
    from rlhf_ray.data.sources import dataset_names, load_rows

    prompts, files = [], {}
    for name, path in zip(dataset_names(paths), paths):
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        rows = load_rows(path)
        if not set(PROMPT_COLUMNS) & rows.columns:
            raise ValueError(f"{path} has none of the columns {', '.join(PROMPT_COLUMNS)}; "
                             f"its columns: {sorted(rows.columns)}")
        if label_field and label_field not in rows.columns:
            raise ValueError(f"--label-field {label_field} is not a column of {path}; its columns: "
                             f"{sorted(rows.columns)}")
        info = files[name] = PromptFile(path, len(rows) + sum(rows.skipped.values()), skipped=Counter(rows.skipped))
        for index, row in enumerate(rows.rows):
            if limit and info.used >= limit:
                break
            turns = prompt_turns(row)
            label = row.get(label_field) if label_field else None
            if not isinstance(turns, str) and label_field and (label is None or str(label) == ""):
                turns = "no_label"
            if isinstance(turns, str):
                info.skipped[turns] += 1
                continue
            source = row.get("source")
            prompts.append(EvalPrompt(turns, name, index, None if source is None else str(source),
                                      None if label is None else str(label)))
            info.used += 1
        if not info.used:
            raise ValueError(f"no usable prompt in {path} ({info.rows} rows; skipped: {dict(info.skipped)})")
    return prompts, files


# ------------------------------------------------------------------------------------------------------ generate

def encode_prompts(prompts: list[EvalPrompt], model_path: str, template: str, max_prompt_tokens: int):
    """The engine's prompts in one policy's tokenizer (over-long ones keep their end) and how many were cut."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.sources import Prompt, render_messages

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out, truncated = [], 0
    for p in prompts:
        text = render_messages(p.messages, template, tokenizer)
        ids = tokenizer(text, add_special_tokens=template == "tulu")["input_ids"]  # as rlhf_ray.data.sources.load_prompts
        if len(ids) > max_prompt_tokens:
            ids, truncated = ids[-max_prompt_tokens:], truncated + 1
            text = tokenizer.decode(ids)
        out.append(Prompt(text=text, token_ids=ids, messages=p.messages, label=p.label))
    return out, truncated


def generate(policy: Policy, args) -> dict:
    """One vLLM engine for this policy in a Ray actor: every prompt answered, then the engine freed."""
    import ray

    from rlhf_ray.actors.generation import GenerationActor
    from rlhf_ray.cluster.roles import wait

    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    role, start = f"generation ({policy.name})", time.perf_counter()
    actor = ray.remote(GenerationActor).options(num_cpus=args.num_cpus, num_gpus=args.num_gpus).remote(
        policy.path, generation, args.max_prompt_tokens + args.max_new_tokens, args.seed, dtype=args.dtype,
        num_gpus=args.num_gpus)
    try:
        cpus = wait(actor.where.remote(), role, "starting its engine", args.timeout_s, "--timeout-s")["cpus"]
        wait(actor.configure_compute.remote({"generate": len(cpus)}), role, "setting threads", args.timeout_s,
             "--timeout-s")
        seeds = [args.seed + i for i in range(len(policy.prompts))]  # a seed per prompt: order does not matter
        batch, _ = wait(actor.generate.remote(policy.prompts, seeds), role,
                        f"answering {len(policy.prompts)} prompts", args.timeout_s, "--timeout-s")
    finally:
        ray.kill(actor)
    return {"responses": batch.response_texts, "finish": batch.finish_reasons,
            "tokens": batch.response_mask.sum(1).long().tolist(), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------- score

def score(judge, policy: Policy, responses: list[str]) -> list[float]:
    """The judge's score of each (prompt as this policy saw it, response), as PPO's reward role scores them."""
    from rlhf_ray.rewards.base import RewardSample

    samples = [RewardSample.of(p.messages, p.text, response, p.label) for p, response in zip(policy.prompts, responses)]
    return [float(s) for s in judge.score(samples)]


# ------------------------------------------------------------------------------------------------------- compare

def win_rate(scores: list[float], baseline: list[float]) -> float:
    """AlpacaEval's win rate, judged by scores: per prompt 1 for a higher score than the baseline's, ½ for a tie."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"win rate of {len(scores)} scores against {len(baseline)} baseline scores")
    return sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline)) / len(scores)


def summarize(records: list[dict], baseline: list[dict]) -> dict:
    """``same_as_baseline``: the share of prompts answered word for word as the baseline did (ties by construction:
    a policy close to its baseline, e.g. a short DPO run from it, wins or loses only on the rest)."""
    n = len(records)
    return {"prompts": n, "win_rate": win_rate([r["score"] for r in records], [r["score"] for r in baseline]),
            "mean_score": sum(r["score"] for r in records) / n, "mean_tokens": sum(r["tokens"] for r in records) / n,
            "eos_rate": sum(r["finish_reason"] == "stop" for r in records) / n,
            "same_as_baseline": sum(r["response"] == b["response"] for r, b in zip(records, baseline)) / n}


def group_keys(prompts: list[EvalPrompt]) -> dict[str, list[int]]:
    """Report groups -> prompt indices: 'all', each file, and each file/source where rows name their source."""
    groups: dict[str, list[int]] = {"all": list(range(len(prompts)))}
    for i, p in enumerate(prompts):
        groups.setdefault(p.file, []).append(i)
        if p.source is not None:
            groups.setdefault(p.group, []).append(i)
    return groups


def spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` evenly spaced from first to last (all of them when there are fewer)."""
    if count <= 0 or not indices:
        return []
    return sorted({indices[round(i * (len(indices) - 1) / max(1, count - 1))] for i in range(min(count, len(indices)))})


def compare(records: dict[str, list[dict]], prompts: list[EvalPrompt], baseline: str, samples: int) -> dict:
    """Per policy and group: win rate against ``baseline``, mean score, tokens, EOS rate and the share of answers equal
    to the baseline's; a few side-by-sides, from the prompts where the two answered differently."""
    groups = group_keys(prompts)
    base = records[baseline]
    out = {"policies": {}, "samples": {}}
    for name, rows in records.items():
        out["policies"][name] = {g: summarize([rows[i] for i in idx], [base[i] for i in idx])
                                 for g, idx in groups.items()}
        picked = spread([i for i in range(len(prompts)) if rows[i]["response"] != base[i]["response"]], samples)
        out["samples"][name] = [{"group": prompts[i].group, "row": prompts[i].row, "prompt": prompts[i].messages,
                                 "baseline_response": base[i]["response"], "baseline_score": base[i]["score"],
                                 "response": rows[i]["response"], "score": rows[i]["score"]} for i in picked]
    return out


# --------------------------------------------------------------------------------------------------------- write

def markdown(report: dict) -> str:
    base, policies = report["baseline"], report["policies"]
    files = report["prompt_files"]
    lines = ["# Policy evaluation", "",
             f"Judge: {judge_label(report['judge'])}. Baseline: **{base}**. "
             f"{sum(f['used'] for f in files.values())} prompts from " + ", ".join(
                 f"{name} ({f['used']} of {f['rows']} rows)" for name, f in files.items())
             + f". Generation: temperature {report['settings']['temperature']:g}, at most "
               f"{report['settings']['max_new_tokens']} new tokens, seed {report['settings']['seed']}.", ""]
    shown = shown_groups(next(iter(policies.values()))["groups"], list(files))
    lines += [f"| group | policy | prompts | win rate vs {base} | mean score | mean tokens | EOS rate | "
              f"same answer as {base} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for g in shown:
        for name, p in policies.items():
            s = p["groups"][g]
            lines.append(f"| {g} | {name} | {s['prompts']} | {s['win_rate']:.3f} | {s['mean_score']:.4f} | "
                         f"{s['mean_tokens']:.1f} | {s['eos_rate']:.2f} | {s['same_as_baseline']:.2f} |")
    lines += ["", f"A win rate counts a tie as half, and an answer equal to {base}'s is a tie."]
    for name, items in report["samples"].items():
        if name == base:
            continue
        lines += ["", f"## {name} vs {base}: samples"]
        if not items:
            lines += ["", f"{name} answered every prompt as {base} did."]
        for s in items:
            lines += ["", f"**{s['group']} row {s['row']}** — {cell(s['prompt'][-1]['content'])}", "",
                      "| policy | score | response |", "|---|---:|---|",
                      f"| {base} | {s['baseline_score']:.4f} | {cell(s['baseline_response'])} |",
                      f"| {name} | {s['score']:.4f} | {cell(s['response'])} |"]
    return "\n".join(lines) + "\n"


def shown_groups(groups: dict[str, dict], files: list[str]) -> list[str]:
    """The groups worth a row: one that holds the same prompts as a narrower one (all = the only file, a file = its
    only source) is left to the narrower one."""
    def narrower(g: str) -> list[str]:
        return files if g == "all" else [c for c in groups if c.startswith(f"{g}/")] if g in files else []

    return [g for g in groups if not any(groups[c]["prompts"] == groups[g]["prompts"] for c in narrower(g))]


def judge_label(judge: dict) -> str:
    """'function rlhf_ray.rewards:char_frequency', 'model runs/rm/final_model', …"""
    return f"{judge['kind']} {judge[REWARD_FIELDS[judge['kind']]]}"


def cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def draw(report: dict, out: Path) -> None:
    """Two bar panels, one bar per policy: win rate against the baseline, and mean score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])
    overall = [report["policies"][n]["groups"]["all"] for n in names]
    colors = ["0.6" if n == report["baseline"] else "C0" for n in names]
    fig, (ax_win, ax_score) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 5), 4.2))
    bars = ax_win.bar(names, [s["win_rate"] for s in overall], color=colors)
    ax_win.bar_label(bars, fmt="%.3f")
    ax_win.axhline(0.5, color="k", linestyle="--", linewidth=1, label="tie with the baseline")
    ax_win.set_ylim(0, 1.05)
    ax_win.set_title(f"win rate vs {report['baseline']} (ties count ½)")
    ax_win.legend(fontsize=8, loc="upper left")
    bars = ax_score.bar(names, [s["mean_score"] for s in overall], color=colors)
    ax_score.bar_label(bars, fmt="%.4g")
    ax_score.set_title("mean score")
    ax_score.axhline(0.0, color="k", linewidth=0.8)
    ax_score.margins(y=0.12)  # room for the labels
    for ax in (ax_win, ax_score):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"{overall[0]['prompts']} prompts judged by {judge_label(report['judge'])}; baseline "
                 f"{report['baseline']} in grey", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write(out: Path, report: dict, responses: list[dict]) -> list[Path]:
    """All four files into a staging folder, then moved into ``out``: a failure leaves no partial set behind."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-evaluation-", dir=out))
    try:
        (staging / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
        (staging / "evaluation.md").write_text(markdown(report))
        (staging / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
        draw(report, staging / "evaluation.png")
        names = ["evaluation.md", "evaluation.json", "evaluation.png", "responses.jsonl"]
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return [out / name for name in names]


# ---------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.evaluate",
                                     description="Win rates of policies against a baseline, judged by a reward model.")
    parser.add_argument("--policy", action="append", required=True, metavar="NAME=SPEC",
                        help="a policy (repeatable): model dir, hub name, tiny:/real: spec, checkpoint or run dir")
    parser.add_argument("--baseline", metavar="NAME", help="the policy the others are compared with (default: the "
                                                            "first)")
    parser.add_argument("--prompts", action="append", required=True, metavar="FILE",
                        help="held-out prompts (repeatable): rows with messages, a prompt string or Tulu 2.5 pairs")
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N usable prompts of each file")
    parser.add_argument("--label-field", metavar="COLUMN", help="each prompt's reference answer (verifiable tasks, "
                                                                "e.g. answer): passed to a function judge as label=…")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="the judge: model=PATH_OR_SPEC, function=module:fn, http=URL or serve=APP")
    parser.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a models.reward setting of the judge (repeatable), e.g. batch_size=16, "
                             "function_kwargs.char=a, template=tokenizer")
    parser.add_argument("--template", default="tulu", choices=["tulu", "tokenizer"],
                        help="how prompts are rendered for the policies (and, by default, for the judge)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts keep their end")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, deterministic")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i: seed + i); also the seed "
                                                            "tiny:/scaled: models are built with, as in PPO")
    parser.add_argument("--samples", type=int, default=3, help="side-by-side samples per policy in the report")
    parser.add_argument("--out", default="runs/evaluation", help="where the report files go")
    parser.add_argument("--cache-dir", help="where tiny:/real:/scaled: models are built")
    parser.add_argument("--dtype", default="float32", help="the engines' dtype")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for each engine's actor")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for each engine's actor (0: vLLM on CPU)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="how long one engine may take to start or "
                                                                        "to answer all prompts")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray of its own)")
    args = parser.parse_args(argv)
    for key in ("limit", "max_new_tokens", "max_prompt_tokens"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.temperature < 0 or args.samples < 0:
        parser.error("--temperature and --samples must be ≥ 0")
    return args


def prepare(args):
    """Everything that can be checked before an engine starts: policies, prompts (in each policy's tokenizer), the
    judge's config."""
    policies = parse_policies(args.policy, args.cache_dir, args.seed)
    baseline = args.baseline or policies[0].name
    if baseline not in {p.name for p in policies}:
        raise ValueError(f"--baseline {baseline!r} is none of the policies ({', '.join(p.name for p in policies)})")
    prompts, files = load_eval_prompts(args.prompts, args.limit, args.label_field)
    judge_cfg = reward_config(args.reward, args.reward_option, args.template)
    for policy in policies:
        try:
            policy.prompts, policy.truncated = encode_prompts(prompts, policy.path, args.template,
                                                              args.max_prompt_tokens)
        except (ValueError, OSError) as err:  # no tokenizer, no chat template for --template tokenizer
            raise ValueError(f"--policy {policy.name}: {err}") from None
    return policies, baseline, prompts, files, judge_cfg


def connect(judge_cfg: RewardConfig, address: str | None) -> None:
    """Join the cluster given (or RAY_ADDRESS), else a local Ray of this command's own; a Serve judge needs the
    cluster its app runs on (rlhf_ray.cli.rm.connect); a process already connected (a test session) stays so."""
    import ray

    from rlhf_ray.cluster.connection import connect as connect_run
    from rlhf_ray.config import RayConfig, RunLogging

    if judge_cfg.kind == "serve" and not ray.is_initialized():
        from rlhf_ray.cli.rm import connect as connect_serve

        connect_serve(address)
    connect_run(SimpleNamespace(ray=RayConfig(address=address), logging=RunLogging()))


def evaluate(args, policies, baseline, prompts, files, judge_cfg, judge) -> tuple[dict, list[dict]]:
    """Every policy's answers, scored by ``judge``, compared -> (evaluation.json's content, responses.jsonl's rows)."""
    records, seconds = {}, {}
    for policy in policies:  # one engine at a time
        generated = generate(policy, args)
        start = time.perf_counter()
        scores = score(judge, policy, generated["responses"])
        seconds[policy.name] = {"generate": generated["seconds"], "score": time.perf_counter() - start}
        records[policy.name] = [
            {"policy": policy.name, "index": i, "file": p.file, "row": p.row, "source": p.source,
             "prompt": p.messages, "response": response, "score": s, "tokens": tokens, "finish_reason": finish}
            for i, (p, response, s, tokens, finish) in enumerate(zip(
                prompts, generated["responses"], scores, generated["tokens"], generated["finish"]))]
        print(f"{policy.name}: {len(prompts)} answers in {seconds[policy.name]['generate']:.1f} s, scored in "
              f"{seconds[policy.name]['score']:.1f} s", file=sys.stderr)
    compared = compare(records, prompts, baseline, args.samples)
    report = {
        "baseline": baseline, "judge": judge_cfg.model_dump(),
        "settings": {k: getattr(args, k) for k in ("template", "max_new_tokens", "max_prompt_tokens", "temperature",
                                                   "seed", "limit", "dtype")},
        "prompt_files": {name: {"path": f.path, "rows": f.rows, "used": f.used, "skipped": dict(f.skipped)}
                         for name, f in files.items()},
        "policies": {p.name: {"spec": p.spec, "path": p.path, "prompts_truncated": p.truncated,
                              "groups": compared["policies"][p.name], "seconds": seconds[p.name]} for p in policies},
        "samples": compared["samples"]}
    return report, [r for rows in records.values() for r in rows]


def main(argv: list[str] | None = None) -> int:
    import signal

    from rlhf_ray.cluster.connection import stop_ray
    from rlhf_ray.cluster.signals import RunStopped

    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:  # bad inputs: one line, exit 2, before any engine starts or any file is written
            policies, baseline, prompts, files, judge_cfg = prepare(args)
            if judge_cfg.kind == "serve":  # its app lives on a cluster: join it first
                connect(judge_cfg, args.address)
            judge = build_judge(judge_cfg, args.cache_dir, args.seed)  # a judge that cannot load fails before Ray
            connect(judge_cfg, args.address)
        except SystemExit as err:  # rlhf_ray.cli.rm.connect: no cluster (its message is complete)
            print(err, file=sys.stderr)
            return 2
        except (ValueError, OSError) as err:
            print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the library wrote
            return 2
        report, responses = evaluate(args, policies, baseline, prompts, files, judge_cfg, judge)
        written = write(Path(args.out), report, responses)
    except (RunStopped, KeyboardInterrupt):
        print("stopped: nothing written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:  # RoleError (an engine failed) is a RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stop_ray()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(markdown(report).split("\n## ")[0] + "\nwritten: " + ", ".join(str(p) for p in written))
    return 0
