"""Reward-model evaluation, RewardBench style: pairwise accuracy (the chosen response scored strictly higher)
overall and per ``source``, on any preference files, for several RMs side by side.

    python -m rlhf_ray.rm_eval --data ../shared/data/starter/prefs_eval_alpacaeval.tulu25.jsonl \\
        --rm mine=runs/rm_smollm2_cpu/final_model --rm tiny=tiny:reward --out runs/rm_eval

An RM is ``NAME=SPEC``; SPEC is a model (local path, hub name, tiny:…/real:…: the ``model`` backend),
``http://…`` / ``https://…`` (the ``http`` backend), ``serve:APP@vN`` or ``serve:APP@latest`` (a version of a Ray
Serve RM; the one scored with is rm_eval.json's ``serve_app``; pass --address) or ``function:module:fn``, or
``judge:SPEC`` (an LLM judge, rlhf_ray.rewards.judge, in pairwise mode: it reads both responses of a pair and says which
it prefers, in both orders), or ``config:FILE.yaml``: a file holding a models.reward tree of any kind (a composite: its
components route by the pairs' ``source``). Every RM scores through the same backend code PPO uses
(rlhf_ray.rewards.backends). Writes <out>/rm_eval.json and <out>/rm_eval.md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rlhf_ray.config import RewardConfig, build_config, read_yaml
from rlhf_ray.data.sources import dataset_names, load_preferences, render_tulu
from rlhf_ray.drivers.reward_model import accuracy_table


def reward_file(path: str) -> dict:
    """A YAML file holding a models.reward tree (any kind: a composite's components, …) as a dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"reward config file {path} does not exist")
    tree = read_yaml(file.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path} must hold the keys of models.reward (kind: composite, components: …), "
                         f"not a {type(tree).__name__}")
    return tree


def reward_config(spec: str, template: str, max_length: int, batch_size: int) -> RewardConfig:
    """An RM spec from the command line -> the reward config PPO would use for it."""
    common = {"template": template, "max_length": max_length, "batch_size": batch_size}
    if spec.startswith("config:"):  # the file's keys win over the command line's defaults
        return build_config({**common, **reward_file(spec[len("config:"):])}, RewardConfig)
    if spec.startswith(("http://", "https://")):
        tree = {"kind": "http", "url": spec}
    elif spec.startswith("serve:"):
        tree = {"kind": "serve", "app": spec[len("serve:"):]}
    elif spec.startswith("function:"):
        tree = {"kind": "function", "function": spec[len("function:"):]}
    elif spec.startswith("judge:"):  # an LLM judge; pairwise, it compares the two responses of each pair directly
        tree = {"kind": "judge", "model": spec[len("judge:"):], "judge": {"mode": "pairwise"}}
    else:
        tree = {"kind": "model", "model": spec}
    return build_config({**tree, **common}, RewardConfig)  # a bad spec: ConfigError, one line naming the key


def score_pairs(backend, pairs) -> torch.Tensor:
    """[N, 2] scores (chosen, rejected). A judge that compares with a reference answer (pairwise) gets the pair's
    other response as each side's reference: chosen wins iff the judge prefers it."""
    from rlhf_ray.rewards.base import RewardSample

    against_other = backend.cfg.compares_with_reference
    samples = []
    for pair in pairs:
        prompt = render_tulu(pair.prompt)
        fields = {"source": pair.source}  # what a composite can route by here
        samples += [RewardSample.of(pair.prompt, prompt, pair.chosen, pair.rejected if against_other else None,
                                    fields=fields),
                    RewardSample.of(pair.prompt, prompt, pair.rejected, pair.chosen if against_other else None,
                                    fields=fields)]
    return torch.as_tensor(backend.score(samples), dtype=torch.float32).view(-1, 2)


def evaluate(rms: dict[str, str], data: list[str], template: str = "tulu", max_length: int = 1024,
             batch_size: int = 8, cache_dir: str | None = None, split: str = "train") -> dict:
    """{rm name: {data name: accuracy table (rlhf_ray.drivers.reward_model.accuracy_table) + seconds}}."""
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.rewards.backends import build_backend
    from rlhf_ray.rewards.composite import with_resolved_models
    from rlhf_ray.run.preflight import check_model_path

    sets = {name: load_preferences(source, split).pairs for name, source in zip(dataset_names(data), data)}
    empty = [name for name, pairs in sets.items() if not pairs]
    if empty:
        raise ValueError(f"no usable preference pair in {', '.join(empty)}")
    results = {}
    for name, spec in rms.items():
        cfg = reward_config(spec, template, max_length, batch_size)
        model_path = resolve_model(cfg.model, cache_dir) if cfg.loads_model else None
        if model_path:
            check_model_path(cfg.model, model_path, f"--rm {name}")
        backend = build_backend(with_resolved_models(cfg, lambda s: resolve_model(s, cache_dir)), model_path=model_path)
        results[name] = {"spec": spec, "sets": {}}
        if cfg.kind == "serve":  # the version it scored with (NAME@latest resolved once)
            results[name]["serve_app"] = backend.app
        for set_name, pairs in sets.items():
            start = time.perf_counter()
            table = accuracy_table(score_pairs(backend, pairs), [p.source or "unknown" for p in pairs])
            results[name]["sets"][set_name] = {**table, "seconds": time.perf_counter() - start}
    return results


def markdown(results: dict) -> str:
    """One row per (data set, source) and per data set overall, one column per RM."""
    names = list(results)
    first = results[names[0]]["sets"]
    lines = ["| data | source | pairs | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for set_name, table in first.items():
        rows = [("**all**", table["pairs"], lambda r: r["sets"][set_name]["accuracy"])]
        rows += [(source, row["pairs"], lambda r, s=source: r["sets"][set_name]["per_source"][s]["accuracy"])
                 for source, row in table["per_source"].items()] if len(table["per_source"]) > 1 else []
        for source, pairs, pick in rows:
            lines.append(f"| {set_name} | {source} | {pairs} | " + " | ".join(f"{pick(results[n]):.3f}" for n in names)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pairwise accuracy of reward models on preference data.")
    parser.add_argument("--data", action="append", required=True, help="preference file or hub dataset (repeatable)")
    parser.add_argument("--split", default="train", help="split of hub datasets")
    parser.add_argument("--rm", action="append", required=True, help="NAME=SPEC (repeatable); see the module doc")
    parser.add_argument("--out", default="runs/rm_eval", help="where rm_eval.json and rm_eval.md go")
    parser.add_argument("--template", default="tulu", choices=["tulu", "tokenizer"], help="as models.reward.template")
    parser.add_argument("--max-length", type=int, default=1024, help="RM input tokens (the end is kept)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--address", help="Ray cluster of serve:APP RMs (default: RAY_ADDRESS)")
    parser.add_argument("--cache-dir", help="where tiny:/real: models are built")
    args = parser.parse_args(argv)
    rms = {}
    for item in args.rm:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            parser.error(f"--rm {item!r} is not NAME=SPEC")
        if name in rms:
            parser.error(f"--rm name {name!r} is given twice")
        rms[name] = spec
    try:
        if any(spec.startswith("serve:") for spec in rms.values()):
            from rlhf_ray.cli.rm import connect

            connect(args.address)
        results = evaluate(rms, args.data, args.template, args.max_length, args.batch_size, args.cache_dir,
                           args.split)
    except SystemExit as err:  # rlhf_ray.cli.rm.connect: no cluster (its message is complete)
        print(err, file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "rm_eval.json").write_text(json.dumps(results, indent=2))
    (out / "rm_eval.md").write_text("# Reward-model pairwise accuracy\n\n" + table)
    print(table + f"\nwritten: {out / 'rm_eval.md'}, {out / 'rm_eval.json'}")
    return 0
