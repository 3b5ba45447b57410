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
``--reward model=SPEC|function=module:fn|http=URL|serve=APP|judge=SPEC|config=FILE.yaml`` (or rlhf_ray.rm_eval's
``function:module:fn``, ``http://…``, ``serve:APP``, ``judge:SPEC``, bare model spec; ``config=``: a file holding a
models.reward tree of any kind, e.g. a composite, whose components route by the prompts' columns), refined with
``--reward-option key=value`` (models.reward keys, e.g. ``judge.mode=pairwise`` with ``--label-field``; ``cache=disk``
keeps the judge's scores for the next evaluation). A Serve APP is APP@vN or APP@latest; evaluation.json records the
version that scored.
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
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlhf_ray.config import RewardConfig
from rlhf_ray.evaluation.comparison import REWARD_FIELDS, compare, markdown, write
from rlhf_ray.evaluation.prompts import encode_prompts, load_eval_prompts


@dataclass
class Policy:
    name: str
    spec: str
    path: str
    prompts: list = field(default_factory=list)  # the engine's prompts (rlhf_ray.data.sources.Prompt) in its tokenizer
    truncated: int = 0                           # how many of them lost their beginning (--max-prompt-tokens)


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
    from rlhf_ray.models.specs import BUILDERS, resolve_model
    from rlhf_ray.run.checkpoint import step_name
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
    if kind == "config" and sep:
        from rlhf_ray.cli.rm_eval import reward_file

        fields = reward_file(value)
    elif sep and kind in REWARD_FIELDS:
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

    cfg, model_path = judge_models(cfg, cache_dir, seed)
    return build_backend(cfg, model_path=model_path)


def judge_models(cfg: RewardConfig, cache_dir: str | None, seed: int) -> tuple[RewardConfig, str | None]:
    """The judge's models located (built, for tiny:/real: specs): its components' and its own (an RM or an LLM judge,
    loaded in this process) -> (the config with its components' paths, its own model's path or None); ValueError
    naming the model that is not there."""
    from rlhf_ray.rewards.composite import with_resolved_models

    try:
        cfg = with_resolved_models(cfg, lambda spec: model_location(spec, cache_dir, seed))
    except ValueError as err:
        raise ValueError(f"--reward: a model component: {err}") from None
    if not cfg.loads_model:
        return cfg, None
    try:
        return cfg, model_location(cfg.model, cache_dir, seed)
    except ValueError as err:
        raise ValueError(f"--reward model={cfg.model}: {err}") from None


# -------------------------------------------------------------------------------------------------- load prompts


# ------------------------------------------------------------------------------------------------------ generate


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

    samples = [RewardSample.of(p.messages, p.text, response, p.label, p.fields)
               for p, response in zip(policy.prompts, responses)]
    return [float(s) for s in judge.score(samples)]


# ------------------------------------------------------------------------------------------------------- compare


# --------------------------------------------------------------------------------------------------------- write


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
                        help="the judge: model=PATH_OR_SPEC, function=module:fn, http=URL or serve=APP@vN|APP@latest")
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
    judge_cfg = reward_config(args.reward, args.reward_option, args.template)
    prompts, files = load_eval_prompts(args.prompts, args.limit, args.label_field, judge_cfg.route_fields())
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
    records, seconds, judged = {}, {}, {}
    for policy in policies:  # one engine at a time
        generated = generate(policy, args)
        start = time.perf_counter()
        scores = score(judge, policy, generated["responses"])
        seconds[policy.name] = {"generate": generated["seconds"], "score": time.perf_counter() - start}
        judged[policy.name] = judge.take_stats().metrics(prefix="")  # cache hits, a composite's components, …
        records[policy.name] = [
            {"policy": policy.name, "index": i, "file": p.file, "row": p.row, "source": p.source,
             "prompt": p.messages, "response": response, "score": s, "tokens": tokens, "finish_reason": finish}
            for i, (p, response, s, tokens, finish) in enumerate(zip(
                prompts, generated["responses"], scores, generated["tokens"], generated["finish"]))]
        hits = (f" (score cache: {judged[policy.name]['cache_hit_rate']:.0%} hits)"
                if "cache_hit_rate" in judged[policy.name] else "")
        print(f"{policy.name}: {len(prompts)} answers in {seconds[policy.name]['generate']:.1f} s, scored in "
              f"{seconds[policy.name]['score']:.1f} s{hits}", file=sys.stderr)
    compared = compare(records, prompts, baseline, args.samples)
    report = {
        "baseline": baseline, "judge": judge_cfg.model_dump(),
        "settings": {k: getattr(args, k) for k in ("template", "max_new_tokens", "max_prompt_tokens", "temperature",
                                                   "seed", "limit", "dtype")},
        "prompt_files": {name: {"path": f.path, "rows": f.rows, "used": f.used, "skipped": dict(f.skipped)}
                         for name, f in files.items()},
        "policies": {p.name: {"spec": p.spec, "path": p.path, "prompts_truncated": p.truncated,
                              "groups": compared["policies"][p.name], "seconds": seconds[p.name],
                              "judge_stats": judged[p.name]} for p in policies},
        "samples": compared["samples"]}
    return report, [r for rows in records.values() for r in rows]


def main(argv: list[str] | None = None) -> int:
    import signal

    from rlhf_ray.cluster.connection import stop_ray
    from rlhf_ray.runtime.signals import RunStopped

    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:  # bad inputs: one line, exit 2, before any engine starts or any file is written
            policies, baseline, prompts, files, judge_cfg = prepare(args)
            if judge_cfg.kind == "serve":  # its app lives on a cluster: join it first
                connect(judge_cfg, args.address)
            judge = build_judge(judge_cfg, args.cache_dir, args.seed)  # a judge that cannot load fails before Ray
            if judge_cfg.kind == "serve" and judge.app != judge_cfg.app:  # the version it scores with, recorded
                print(f"judge: Serve RM '{judge.app}' (resolved from {judge_cfg.app})", file=sys.stderr)
                judge_cfg.app = judge.app
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
