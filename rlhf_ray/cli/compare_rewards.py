"""Which reward makes the better policy: one PPO (or GRPO, RLOO, …) config trained against K rewards, the checkpoints
along each run scored on held-out prompts by a gold judge that no run trains on, and the proxy and gold scores set
against the KL from the initial policy, where over-optimisation shows as the gold curve's turn (Gao et al., 2022).

    python -m rlhf_ray.compare_rewards --config configs/smollm2_cpu.yaml \\
        --reward rm64=model=runs/proxy64 --reward rm512=model=runs/proxy512 --reward judge=judge=real:smollm2-135m \\
        --gold model=runs/gold_rm --prompts ../shared/data/starter/prefs_eval_alpacaeval.tulu25.jsonl --limit 64 \\
        --out runs/compare_rewards  generation.max_new_tokens=64        # key=value: every run's config
    ray job submit --working-dir . -- python -m rlhf_ray.compare_rewards …   # every run joins the job's cluster

A reward is ``NAME=SPEC`` with SPEC as rlhf_ray.evaluate's ``--reward`` takes it (``model=``, ``function=``,
``http=``, ``serve=APP@vN``, ``judge=``, ``config=FILE.yaml`` for any models.reward tree, a composite too), refined by
``--reward-option NAME:key=value``; the gold judge likewise (``--gold SPEC``, ``--gold-option key=value``). A reward
model renders conversations with the base config's data.template unless an option says otherwise.

1. Train. Each reward's run is the base config with its models.reward, as ``python -m rlhf_ray.train`` in
   ``<out>/runs/NAME`` (one after another: each run takes the cluster's resources as its config reserves them). The
   harness sets the checkpoint cadence (``--evaluations`` points along the run) and keeps each checkpoint's policy
   (checkpoint.keep_policies; keep_last 1: the latest stays resumable). A run that fails is recorded with its error and
   the others go on. A run already finished with the same config (a harness run again) is reused.
2. Evaluate. One vLLM engine answers the held-out prompts for the initial policy and then, taking each saved policy's
   weights in place, for every checkpoint (``--samples-per-prompt`` samples each, at the run's temperature, prompt i
   seeded alike for every policy); the initial policy (a reference actor) gives the KL of each response; the gold
   judge and the run's own reward (the proxy, raw, before normalisation) score every response in this process.
   Evaluations are kept in ``<out>/evaluations`` and reused when the settings match.
3. Report. ``compare_rewards.md`` (a row per policy: KL, proxy, gold with its interval, gold change against the
   initial policy with its paired interval), ``compare_rewards.json``, ``compare_rewards.png`` (gold and proxy against
   KL) and ``responses.jsonl``; the best checkpoint by gold, and per reward the KL where its gold score peaks.

Bad inputs (a config, a reward or a gold that cannot be built, prompts that do not load) exit 2 before anything runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlhf_ray.config import (ConfigError, ExperimentConfig, RewardConfig, build_config, dump_config, load_config,
                             merge_tree, parse_overrides, read_yaml, upgrade_saved)
from rlhf_ray.evaluation import reward_comparison
from rlhf_ray.evaluation.comparison import write_together
from rlhf_ray.run.trackers import grouped

DONE_MARKER = "compare_rewards.done.json"  # in a run's directory: it finished with the config beside it


@dataclass
class Experiment:
    name: str
    reward: RewardConfig
    cfg: ExperimentConfig                         # the run's whole config
    out: Path
    status: str = "pending"
    error: str | None = None
    train_metrics: dict[int, dict] = field(default_factory=dict)  # step -> that step's metrics.jsonl row

    @property
    def config_text(self) -> str:
        return dump_config(self.cfg)

    def same_config(self, saved_text: str) -> bool:
        """``saved_text`` (a finished run's marker, a stopped run's <name>.yaml) is this run's config: read with this
        version's schema — keys added since take their defaults, keys reshaped since their new form, so a newer rlhf-ray reuses the runs an older one
        made — the trees are equal. A config it cannot read (a key removed since) is another run."""
        import yaml

        try:
            saved = build_config(upgrade_saved(read_yaml(saved_text)), schema=ExperimentConfig)
        except (ConfigError, yaml.YAMLError, TypeError):
            return False
        return saved.model_dump(mode="json") == self.cfg.model_dump(mode="json")


# ------------------------------------------------------------------------------------------------------- prepare

def parse_reward_options(items: list[str], names: list[str]) -> dict[str, list[str]]:
    """``NAME:key=value`` -> {NAME: [key=value, …]}; a name no --reward gives is an error."""
    options: dict[str, list[str]] = {name: [] for name in names}
    for item in items:
        name, sep, option = item.partition(":")
        if not sep or name not in options or "=" not in option:
            raise ValueError(f"--reward-option {item!r} is not NAME:key=value with NAME one of the rewards "
                             f"({', '.join(names)})")
        options[name].append(option)
    return options


def experiments(args, base: ExperimentConfig) -> list[Experiment]:
    """Each ``--reward NAME=SPEC`` as its run's config: the base with that models.reward and the harness's
    checkpoint settings; ValueError naming the reward that does not make a valid run."""
    from rlhf_ray.cli.evaluate import reward_config

    named = []
    for item in args.reward:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--reward {item!r} is not NAME=SPEC (e.g. rm=model=runs/rm/final_model)")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--reward name {name!r}: letters, digits, - and _ only (it names a directory)")
        if name in [n for n, _ in named]:
            raise ValueError(f"--reward name {name!r} is given twice")
        named.append((name, spec))
    options = parse_reward_options(args.reward_option, [n for n, _ in named])
    every = max(1, base.num_steps // args.evaluations)
    out = []
    for name, spec in named:
        try:
            reward = reward_config(spec, options[name], base.data.template)
        except ValueError as err:
            raise ValueError(f"--reward {name}: {err}") from None
        tree = base.model_dump(mode="json")
        tree["models"]["reward"] = reward.model_dump(mode="json")
        tree["output_dir"] = str(Path(args.out) / "runs" / name)
        tree["overwrite"], tree["resume"] = True, None
        tree["checkpoint"].update(every_steps=every, keep_last=1, keep_policies=True, at_end=True)
        # the runs in one W&B group and one MLflow experiment
        tree = merge_tree(tree, parse_overrides([f"{k}={v}" for k, v in grouped(base.logging, Path(args.out)).items()]))
        try:
            cfg = build_config(tree, schema=ExperimentConfig)
        except ConfigError as err:
            raise ValueError(f"--reward {name}: the run's config: {str(err).removeprefix('invalid config: ')}") from None
        out.append(Experiment(name, cfg.models.reward, cfg, Path(cfg.output_dir)))
    return out


def prepare(args):
    """Everything checked before a run starts: the base config, each reward's run config, the gold judge's config
    and models, the initial policy, the held-out prompts in its tokenizer."""
    from rlhf_ray.cli.evaluate import judge_models, model_location, reward_config
    from rlhf_ray.evaluation.prompts import encode_prompts, load_eval_prompts

    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    runs = experiments(args, base)
    try:
        gold = reward_config(args.gold, args.gold_option, base.data.template)
        judge_models(gold, base.models.cache_dir, base.seed)  # built here, before any run, to fail early
    except ValueError as err:
        raise ValueError(f"--gold: {err}") from None
    initial = model_location(base.models.policy, base.models.cache_dir, base.seed)
    route_fields = sorted({f for r in [gold, *(e.reward for e in runs)] for f in r.route_fields()})
    prompts, files = load_eval_prompts(args.prompts, args.limit, args.label_field, route_fields)
    encoded, truncated = encode_prompts(prompts, initial, base.data.template, base.data.max_prompt_tokens)
    return SimpleNamespace(base=base, runs=runs, gold=gold, initial=initial, prompts=prompts, files=files,
                           encoded=encoded, truncated=truncated)


# --------------------------------------------------------------------------------------------------------- train

def train(run: Experiment, timeout_s: float) -> None:
    """The run as ``python -m rlhf_ray.train`` (joining RAY_ADDRESS's cluster where there is one), its console
    prefixed with its name; reused when it finished before with this config."""
    from rlhf_ray.run.checkpoint import latest_valid

    done = run.out / DONE_MARKER
    if done.is_file() and run.same_config(json.loads(done.read_text()).get("config", "")):
        run.status = "reused"
        print(f"[{run.name}] finished before with this config: reused ({run.out})", file=sys.stderr)
    else:
        done.unlink(missing_ok=True)
        run.out.mkdir(parents=True, exist_ok=True)
        config_path = run.out.parent / f"{run.name}.yaml"
        # a run stopped before (the harness interrupted) continues from its checkpoint if its config is the same
        same = config_path.is_file() and run.same_config(config_path.read_text())
        config_path.write_text(run.config_text)
        command = train_command(config_path, resume=same and latest_valid(run.out) is not None)
        started = time.perf_counter()
        with open(run.out.parent / f"{run.name}.console.log", "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                for line in process.stdout:
                    log.write(line)
                    print(f"[{run.name}] {line}", end="", file=sys.stderr)
                    if time.perf_counter() - started > timeout_s:
                        raise TimeoutError(f"the run took more than --run-timeout-s {timeout_s:.0f} s")
                code = process.wait()
            except BaseException as err:
                process.terminate()  # the run checkpoints its finished steps on SIGTERM
                process.wait(60)
                if not isinstance(err, TimeoutError):
                    raise
                run.status, run.error = "failed", str(err)  # recorded; the other runs go on
                return
        if code != 0:
            run.status, run.error = "failed", f"exit {code}: see {log.name}"
            return
        done.write_text(json.dumps({"config": run.config_text, "seconds": time.perf_counter() - started}))
        run.status = "trained"
    metrics = run.out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    run.train_metrics = {row["step"]: row for row in rows if "step" in row}
    if run.reward.kind == "serve" and (run.out / "config.yaml").is_file():  # the version the run pinned and scored by
        run.reward = run.reward.model_copy(update={"app": pinned_app(run.out / "config.yaml")})


def train_command(config_path: Path, resume: bool) -> list[str]:
    """``python -m rlhf_ray.train`` on the run's config: from scratch (the config says overwrite) or, ``resume``,
    continuing from its latest checkpoint (overwrite off: the two exclude each other)."""
    overrides = ["resume=auto", "overwrite=false"] if resume else []
    return [sys.executable, "-m", "rlhf_ray.train", "--config", str(config_path), *overrides]


def pinned_app(config_file: Path) -> str:
    return read_yaml(config_file.read_text())["models"]["reward"]["app"]


# ------------------------------------------------------------------------------------------------------ evaluate

class Evaluator:
    """One engine and one initial-policy reference for every policy evaluated; the gold judge in this process."""

    def __init__(self, args, state):
        import ray

        from rlhf_ray.actors.generation import GenerationActor
        from rlhf_ray.actors.reference import ReferenceActor
        from rlhf_ray.cli.evaluate import build_judge

        base = state.base
        self.args, self.state, self.base = args, state, base
        self.samples = args.samples_per_prompt
        self.temperature = base.generation.temperature if args.temperature is None else args.temperature
        generation = {**base.generation.model_dump(), "n_samples_per_prompt": self.samples,
                      "temperature": self.temperature}
        dtype, micro_batch_size, _, forward = base.reference_forward()
        self.engine = ray.remote(GenerationActor).options(num_cpus=args.num_cpus).remote(
            state.initial, generation, base.data.max_prompt_tokens + base.generation.max_new_tokens, base.seed,
            dtype=base.models.dtype)
        self.reference = ray.remote(ReferenceActor).options(num_cpus=args.num_cpus).remote(
            state.initial, dtype, micro_batch_size, self.temperature, forward=forward)
        self.gold = build_judge(state.gold, base.models.cache_dir, base.seed)
        cpus = self.call("engine", self.engine.where.remote(), "starting its engine")["cpus"]
        self.call("engine", self.engine.configure_compute.remote({"generate": len(cpus)}), "setting threads")
        cpus = self.call("reference", self.reference.where.remote(), "loading the initial policy")["cpus"]
        self.call("reference", self.reference.configure_compute.remote({"score": len(cpus)}), "setting threads")
        self.loaded = None  # the saved policy the engine holds (None: the initial one)

    def call(self, role: str, ref, what: str):
        from rlhf_ray.cluster.roles import wait

        return wait(ref, f"evaluation {role}", what, self.args.timeout_s, "--timeout-s")

    def settings(self) -> dict:
        """What an evaluation depends on besides the policy: a kept evaluation is reused only under the same."""
        return {"prompts": [p.token_ids for p in self.state.encoded], "samples": self.samples,
                "temperature": self.temperature, "seed": self.base.seed,
                "max_new_tokens": self.base.generation.max_new_tokens,
                # what the gold's config sets: a key added to the reward config since keeps the evaluations
                "gold": self.state.gold.model_dump(mode="json", exclude_defaults=True)}

    def policy(self, label: str, path: str | None) -> dict:
        """The responses of the policy at ``path`` (None: the initial policy), their KL from the initial policy and
        their gold scores; kept under <out>/evaluations and reused when the policy's files and settings match."""
        policy = path or self.state.initial
        key = hashlib.sha256(json.dumps({"settings": self.settings(), "policy": policy, "files": fingerprint(policy),
                                         "initial": self.state.initial}, sort_keys=True).encode()).hexdigest()[:16]
        kept = Path(self.args.out) / "evaluations" / f"{label}.json"
        if kept.is_file():
            record = json.loads(kept.read_text())
            if record.get("key") == key:
                print(f"{label}: evaluation kept from before: reused", file=sys.stderr)
                return record
        started = time.perf_counter()
        if path != self.loaded:
            self.call("engine", self.engine.load_policy.remote(path or self.state.initial), f"loading {label}")
            self.loaded = path
        prompts = self.state.encoded
        seeds = [self.base.seed + i for i in range(len(prompts))]
        # computes(...) methods answer (result, seconds)
        batch, _ = self.call("engine", self.engine.generate.remote(prompts, seeds), f"answering for {label}")
        reference, _ = self.call("reference", self.reference.logprobs.remote(batch), f"KL of {label}")
        mask = batch.response_mask
        kl = ((batch.gen_logprobs - reference) * mask).sum(1)
        samples = self.reward_samples(batch.response_texts)
        record = {"key": key, "label": label, "policy": path or self.state.initial,
                  "responses": batch.response_texts, "finish": batch.finish_reasons,
                  "tokens": mask.sum(1).long().tolist(), "kl": kl.tolist(),
                  "gold": [float(s) for s in self.gold.score(samples)],
                  "gold_stats": self.gold.take_stats().metrics(prefix=""), "seconds": time.perf_counter() - started}
        write_together(kept.parent, {kept.name: json.dumps(record)}, {})
        print(f"{label}: {len(samples)} answers, KL {sum(record['kl']) / len(samples):.3f}, gold "
              f"{sum(record['gold']) / len(samples):.4f} ({record['seconds']:.0f} s)", file=sys.stderr)
        return record

    def reward_samples(self, responses: list[str]):
        from rlhf_ray.rewards.base import RewardSample

        prompts = [p for p in self.state.encoded for _ in range(self.samples)]
        return [RewardSample.of(p.messages, p.text, r, p.label, p.fields) for p, r in zip(prompts, responses)]

    def close(self) -> None:
        import ray

        for actor in (self.engine, self.reference):
            ray.kill(actor)


def fingerprint(path: str) -> dict:
    """A policy's weight files by name, size and modification time (none for a hub name)."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).glob("*.safetensors"))}


def described(reward: RewardConfig) -> dict:
    """A reward's config as the report shows it: its kind and what differs from the defaults."""
    return {"kind": reward.kind, **reward.model_dump(mode="json", exclude_defaults=True)}


def point(record: dict, initial: dict, proxy: list[float], step: int, samples: int, train_row: dict) -> dict:
    from rlhf_ray.evaluation.reward_comparison import paired_change, summary

    n = len(record["responses"])
    return {"step": step, "policy": record["policy"], "kl": summary(record["kl"], samples),
            "proxy": summary(proxy, samples), "gold": summary(record["gold"], samples),
            "gold_change": paired_change(record["gold"], initial["gold"], samples),
            "mean_tokens": sum(record["tokens"]) / n, "eos_rate": sum(f == "stop" for f in record["finish"]) / n,
            "train": {k: train_row[k] for k in ("score/mean", "kl/mean", "reward/mean") if k in train_row}}


def evaluate_runs(args, state) -> tuple[dict, list[dict]]:
    """Every run's saved policies and the initial policy evaluated -> (the report's runs, responses.jsonl rows)."""
    from rlhf_ray.cli.evaluate import build_judge
    from rlhf_ray.run.checkpoint import saved_policies

    evaluator = Evaluator(args, state)
    try:
        initial = evaluator.policy("initial", None)
        runs, rows = {}, []
        for run in state.runs:
            entry = {"status": run.status, "error": run.error, "dir": str(run.out),
                     "reward": described(run.reward), "points": []}
            runs[run.name] = entry
            policies = saved_policies(run.out)
            if not policies:
                continue
            records = [(0, initial), *((step, evaluator.policy(f"{run.name}-step-{step}", str(path)))
                                       for step, path in policies.items())]
            proxy = build_judge(run.reward, state.base.models.cache_dir, state.base.seed)
            for step, record in records:
                scores = [float(s) for s in proxy.score(evaluator.reward_samples(record["responses"]))]
                entry["points"].append(point(record, initial, scores, step, evaluator.samples,
                                             run.train_metrics.get(step, {})))
                rows += [{"reward": run.name, "step": step, "index": i, "response": r, "kl": k, "gold": g, "proxy": s}
                         for i, (r, k, g, s) in enumerate(zip(record["responses"], record["kl"], record["gold"],
                                                              scores))]
    finally:
        evaluator.close()
    return runs, rows


# ---------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.compare_rewards",
                                     description="Train one config against K rewards; score the checkpoints along "
                                                 "each run with a gold judge; proxy and gold against KL.")
    parser.add_argument("--config", required=True, help="the PPO/GRPO experiment every run starts from")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every run's config")
    parser.add_argument("--reward", action="append", required=True, metavar="NAME=SPEC",
                        help="a reward to train against (repeatable): NAME=model=PATH, NAME=function=module:fn, "
                             "NAME=judge=SPEC, NAME=serve=APP@vN, NAME=config=FILE.yaml, …")
    parser.add_argument("--reward-option", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a models.reward setting of one reward (repeatable), e.g. rm:normalize=running")
    parser.add_argument("--gold", required=True, metavar="SPEC", help="the gold judge, as --reward's SPEC")
    parser.add_argument("--gold-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a models.reward setting of the gold judge (repeatable)")
    parser.add_argument("--prompts", action="append", required=True, metavar="FILE",
                        help="held-out prompts (repeatable), as rlhf_ray.evaluate reads them")
    parser.add_argument("--limit", type=int, metavar="N", help="the first N usable prompts of each file")
    parser.add_argument("--label-field", metavar="COLUMN", help="each prompt's reference answer, for a verifying judge")
    parser.add_argument("--evaluations", type=int, default=4,
                        help="checkpoints evaluated along each run (every num_steps // N steps, and the last)")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="responses per held-out prompt")
    parser.add_argument("--temperature", type=float, help="sampling temperature of the evaluation (default: the "
                                                          "config's generation.temperature, the policy trained)")
    parser.add_argument("--out", default="runs/compare_rewards", help="runs, evaluations and the report")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the evaluation's engine and "
                                                                    "for its reference actor")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="how long one evaluation call may take")
    parser.add_argument("--run-timeout-s", type=float, default=7 * 24 * 3600.0, help="how long one run may take")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray of its own)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before, between or after the options
    for key in ("limit", "evaluations", "samples_per_prompt"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.temperature is not None and args.temperature <= 0:
        parser.error("--temperature must be > 0: the KL is measured on the policy's samples")
    return args


def report_of(args, state, runs: dict) -> dict:
    from rlhf_ray.evaluation.comparison import judge_label

    gold = {**described(state.gold), "label": judge_label(state.gold.model_dump(mode="json"))}
    report = {"config": args.config, "overrides": args.overrides, "gold": gold,
              "settings": {"prompts": len(state.prompts), "prompt_files": list(state.files),
                           "prompts_truncated": state.truncated, "samples_per_prompt": args.samples_per_prompt,
                           "temperature": args.temperature if args.temperature is not None
                           else state.base.generation.temperature,
                           "max_new_tokens": state.base.generation.max_new_tokens, "seed": state.base.seed,
                           "evaluations": args.evaluations},
              "runs": runs}
    report["conclusions"] = reward_comparison.conclusions(runs)
    return report


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.cli.evaluate import connect
    from rlhf_ray.cluster.connection import stop_ray
    from rlhf_ray.runtime.signals import RunStopped

    args = parse_args(argv)
    try:
        state = prepare(args)
    except (ValueError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    if args.address:  # the runs join it too
        os.environ["RAY_ADDRESS"] = args.address
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # connect() installs its own
    try:
        for run in state.runs:
            train(run, args.run_timeout_s)
        connect(state.gold, args.address)
        runs, rows = evaluate_runs(args, state)
        report = report_of(args, state, runs)
        written = reward_comparison.write(Path(args.out), report, rows)
    except (RunStopped, KeyboardInterrupt):  # SIGTERM/SIGINT once Ray is connected, Ctrl-C before
        print("stopped: the runs finished so far and the evaluations kept are reused by the next call",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stop_ray()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(reward_comparison.markdown(report))
    print("written: " + ", ".join(str(p) for p in written))
    failed = [name for name, run in runs.items() if run["status"] == "failed"]
    return 1 if failed else 0
