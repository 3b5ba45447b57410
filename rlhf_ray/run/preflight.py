"""Checks that need no cluster, run before one starts: a mistake costs seconds, not an engine start-up.

Each check raises ``PreflightError`` with one line that names the config key and what to do.
"""
from __future__ import annotations

import inspect
import uuid
from pathlib import Path

from rlhf_ray.config import ExperimentConfig, RewardConfig


class PreflightError(ValueError):
    """The config points at something that cannot work; the message says what and where."""


def check_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it is writable (a probe file is written and removed)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PreflightError(f"output_dir={str(path)!r} is not writable: {err.strerror or err}") from None
    return out


RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "tensorboard", "checkpoints", "report.png", "final_model", "logs",
               "config.yaml", "policies", "plan.json", "placement.json", "timeline.png",
               "trackers.json", "wandb", "mlflow.db", "mlartifacts")  # the trackers (rlhf_ray.run.trackers)
RUN_OUTPUT_PATTERNS = ("trace*.json",)  # the timeline's trace and its parts (rlhf_ray.run.timeline)


def claim_output_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """A new run does not mix its results into an earlier run's: refuse a used output dir unless told to
    resume or overwrite; overwrite removes the earlier run's outputs (and nothing else)."""
    import shutil

    found = [name for name in RUN_OUTPUTS[:4] if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise PreflightError(f"output_dir={str(out)!r} already holds a run ({', '.join(found)}): resume=auto continues "
                             f"it, overwrite=true replaces it, or choose another output_dir")
    for target in [out / name for name in RUN_OUTPUTS] + [p for pattern in RUN_OUTPUT_PATTERNS
                                                           for p in out.glob(pattern)]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def looks_like_local_path(spec: str) -> bool:
    """A spec written as a path: absolute, ./ or ../ relative, ~, or with more than one '/' (hub ids have one)."""
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def check_model_path(spec: str, resolved: str, key: str) -> None:
    """A model given as a local path must be a directory with a config.json; a hub name must be in the
    local Hugging Face cache or reachable on the Hub (``check_hub_model``)."""
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{key}={spec!r} is a directory without config.json: not an HF model directory")
        return
    if looks_like_local_path(resolved) or path.exists():
        raise PreflightError(f"{key}={spec!r}: no such model directory ({path})")
    check_hub_model(resolved, key)


HUB_TIMEOUT_S = 10.0


def check_hub_model(repo_id: str, key: str) -> None:
    """A hub name is usable if its config is in the local cache or the Hub answers for it — asked once, with
    a short timeout: without this a machine with no network learns it after ~50 s of retries per model."""
    import huggingface_hub
    from huggingface_hub import errors

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: loads offline
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PreflightError(f"{key}={repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                             f"download it first (huggingface-cli download {repo_id}) or pass a local path")
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except errors.RepositoryNotFoundError:
        raise PreflightError(f"{key}={repo_id!r}: no such model on the Hugging Face Hub (or it is private: "
                             "log in with `huggingface-cli login`), and not a local directory") from None
    except errors.GatedRepoError:
        raise PreflightError(f"{key}={repo_id!r} is gated on the Hub: accept its licence and log in "
                             "(`huggingface-cli login`), or pass a local path") from None
    except Exception as err:  # no network, DNS, proxy, timeout (httpx or requests errors, by hub version)
        cause = str(err).splitlines()[0][:200]
        raise PreflightError(f"{key}={repo_id!r} is not a local directory, not in the Hugging Face cache, and the "
                             f"Hub cannot be reached ({cause}): pass a local path, or download it where there is "
                             f"network (huggingface-cli download {repo_id})") from None


def check_reward_function(reward: RewardConfig) -> None:
    """The reward function imports, is callable and accepts (prompt, response, **function_kwargs)."""
    from rlhf_ray.rewards.base import load_function

    fn = load_function(reward.function)  # ValueError with the key and the import error
    try:
        inspect.signature(fn).bind("prompt", "response", **reward.function_kwargs)
    except TypeError as err:
        raise PreflightError(f"models.reward.function={reward.function!r} cannot be called as "
                             f"f(prompt, response, **models.reward.function_kwargs={reward.function_kwargs}): "
                             f"{err}") from None
    except ValueError:  # no signature (a builtin, a C extension): it is called as is
        pass


def check_reward_template(reward: RewardConfig, rm_path: str, messages: list[dict], label: str | None = None) -> None:
    """The RM's tokenizer can render a (prompt, response) conversation in ``models.reward.template``; a judge's
    template renders the judging prompt of that conversation (``check_judge``)."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.sources import render_messages

    tokenizer = AutoTokenizer.from_pretrained(rm_path)
    if reward.kind == "judge":
        return check_judge(reward, tokenizer, messages, label)
    try:
        render_messages(messages + [{"role": "assistant", "content": "a response"}], reward.template, tokenizer,
                        add_generation_prompt=False)
    except Exception as err:  # jinja errors, missing templates: any failure here would fail every step
        raise PreflightError(f"models.reward.template={reward.template!r} cannot render a conversation with the "
                             f"reward model's tokenizer ({rm_path}): {err}") from None


def check_judge(reward: RewardConfig, tokenizer, messages: list[dict], label: str | None) -> None:
    """The judge's template loads and renders the judging prompt of ``messages`` (and ``label``, the reference answer),
    and with judge.score=expected every choice is one token of the judge's tokenizer."""
    from rlhf_ray.rewards.base import RewardSample
    from rlhf_ray.rewards.judge import check_single_token_choices, judging_prompts, load_template

    if reward.judge.baseline is not None:
        label = "the baseline policy's answer"  # generated during the run
    sample = RewardSample.of(messages, "", "a response", label)
    try:
        prompts = judging_prompts(load_template(reward.judge.template, reward.judge.mode), sample, reward.judge)
        check_single_token_choices(tokenizer, reward.judge, prompts[0].choices)
    except ValueError as err:  # its message names the key
        raise PreflightError(str(err)) from None
    except Exception as err:  # noqa: BLE001 — jinja: an unknown variable, a filter that fails
        raise PreflightError(f"models.reward.judge.template cannot render a judging prompt: {type(err).__name__}: "
                             f"{err}") from None


def check_reward_stats(reward: RewardConfig, rm_path: str) -> None:
    """``normalize='stored'`` needs the statistics saved with the RM (reward_stats.json in its directory)."""
    from rlhf_ray.rewards.base import require_reward_stats

    if reward.normalize == "stored":
        try:
            require_reward_stats(rm_path, f"the reward model {reward.model}")
        except ValueError as err:
            raise PreflightError(str(err)) from None


def check_reward_http(cfg: ExperimentConfig) -> None:
    """The bearer token's variable, when one is named, is set (the token itself never goes in the config)."""
    import os

    env = cfg.models.reward.token_env
    if env and not os.environ.get(env):
        raise PreflightError(f"models.reward.token_env={env!r}: that environment variable is not set; export it "
                             f"(export {env}=…) before starting the run")


def check_reward_serve(cfg: ExperimentConfig) -> None:
    """A Serve RM lives on a cluster of its own making: the run must join that cluster, not start a local Ray."""
    import os

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        raise PreflightError(f"models.reward.kind='serve' needs the Ray cluster where the app "
                             f"'{cfg.models.reward.app}' runs: set ray.address (e.g. ray.address=auto) or RAY_ADDRESS")


def check_reward_composite(cfg: ExperimentConfig, rm_path: str | None) -> None:
    """Each component as a reward of its own kind (a model or judge component's `model`: its resolved path)."""
    for component in cfg.models.reward.components:
        alone = cfg.model_copy(update={"models": cfg.models.model_copy(update={"reward": component})})
        try:
            REWARD_CHECKS[component.kind](alone, component.model if component.loads_model else None)
        except (PreflightError, ValueError) as err:
            raise PreflightError(f"reward component {component.name!r}: {err}") from None


REWARD_CHECKS = {  # models.reward.kind -> what can be checked before a cluster starts
    "model": lambda cfg, rm_path: check_reward_stats(cfg.models.reward, rm_path) if rm_path else None,
    "function": lambda cfg, rm_path: check_reward_function(cfg.models.reward),
    "http": lambda cfg, rm_path: check_reward_http(cfg),
    "serve": lambda cfg, rm_path: check_reward_serve(cfg),
    "judge": lambda cfg, rm_path: None,  # its template needs the data's first prompt: check_reward_template
    "composite": check_reward_composite,
}


def check_context(cfg: ExperimentConfig, policy_path: str) -> None:
    """The longest sequence, data.max_prompt_tokens + generation.max_new_tokens, within the policy's context as vLLM
    derives it from config.json (max_position_embeddings or the like, stretched by RoPE scaling): the engine would
    refuse it only once it starts, and the learner would run positions the model never saw. A config that cannot be
    read here is left to the engine."""
    from transformers import AutoConfig

    from rlhf_ray.planning.models import context_limit

    try:
        config = AutoConfig.from_pretrained(policy_path)
    except Exception:  # noqa: BLE001 — custom code, a hub hiccup: the engine checks again when it starts
        return
    limit, key = context_limit(getattr(config, "text_config", None) or config)
    longest = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    if limit and longest > limit:
        room = int(limit) - cfg.data.max_prompt_tokens
        fix = (f"lower generation.max_new_tokens to {room} or less" if room > 0 else
               "lower data.max_prompt_tokens and generation.max_new_tokens to fit it together")
        raise PreflightError(f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} + generation.max_new_tokens="
                             f"{cfg.generation.max_new_tokens} = {longest} tokens is over the policy's context of "
                             f"{int(limit)} ({key} in its config.json): {fix}")


def check_experiment(cfg: ExperimentConfig, model_paths: dict[str, str | None],
                     reward_components: dict[str, str] | None = None) -> None:
    """Model paths (key -> resolved path; ``reward_components``: the reward's other models' specs -> theirs,
    rlhf_ray.rewards.composite.other_models), the policy's context (``check_context``), and what the reward backend
    needs (``REWARD_CHECKS``)."""
    models = cfg.models
    specs = {"models.policy": models.policy, "models.reference": models.reference_path,
             "models.reward.model": models.reward.model, "models.value_model": models.value_model_path}
    for key, resolved in model_paths.items():
        if resolved:
            check_model_path(specs[key] or resolved, resolved, key)
    if reward_components:
        from rlhf_ray.rewards.composite import other_models

        keys = other_models(models.reward)
        for spec, resolved in reward_components.items():
            check_model_path(spec, resolved, keys.get(spec, "models.reward"))
    if model_paths.get("models.policy"):
        check_context(cfg, model_paths["models.policy"])
    reward = models.reward
    if reward_components:  # each model component checked at its resolved path
        from rlhf_ray.rewards.composite import with_resolved_models

        reward = with_resolved_models(reward, reward_components.get)
        cfg = cfg.model_copy(update={"models": models.model_copy(update={"reward": reward})})
    REWARD_CHECKS[reward.kind](cfg, model_paths.get("models.reward.model"))
