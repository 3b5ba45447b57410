"""Checkpoints: everything a run needs to continue exactly, written atomically, verified when read.

    <output_dir>/checkpoints/step-000012/
        policy/          the policy in HF format (safetensors, config, tokenizer): transformers and vLLM load it as is
        learner/state/   DeepSpeed checkpoint of every learner rank: policy and value weights, optimizer, LR schedule
        learner/rank-N.safetensors   each rank's torch RNG and update counter
        trainer.json     the step, the prompt sampler's position, how sampling is seeded, restarts so far
        config.yaml      the run's config
        manifest.json    size and SHA-256 of every file above; written last

A save goes into ``checkpoints/.partial-step-…`` and is renamed into place only when it is complete and
its manifest written: a crash or a full disk mid-save leaves the earlier checkpoints as they were (the
next run removes the partial directory). A checkpoint counts as valid only if every file of its manifest
is there with its size and hash. Weights are read back through safetensors or ``torch.load(weights_only=True)``
only (actors.learner), never by unpickling arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path


log = logging.getLogger(__name__)

DIRNAME = "checkpoints"
POLICIES_DIRNAME = "policies"  # policy/ of checkpoints pruned under checkpoint.keep_policies
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
PARTIAL_PREFIX = ".partial-"
FORMAT_VERSION = 1

# Settings a checkpoint cannot be continued under: other models, data, seed or batch geometry would make
# the run a different one (or the DeepSpeed state unloadable); everything else may change on resume.
MUST_MATCH = ("seed", "model", "data.", "generation.n_samples_per_prompt",  # "model": models.* (PPO), model (RM)
              "ppo.rollout_batch_size", "ppo.mini_batch_size", "ppo.advantage",  # advantage: with or without a critic
              "training.batch_size", "dpo.batch_size", "resources.learner.num_actors",
              "lora", "reference",  # SFT/DPO: what trains, and which reference log-probs the checkpoint keeps
              "deepspeed.zero_stage", "deepspeed.precision")
NEVER_COMPARED = ("output_dir", "resume", "overwrite", "models.cache_dir")
# how the reward is reached or shaped, not which model it is: a resume may change these (logged)
CHANGEABLE = tuple(f"models.reward.{key}" for key in ("url", "timeout_s", "retries", "backoff_s", "outage_s",
                                                        "token_env", "batch_size", "normalize", "clip",
                                                        "cache", "cache_path"))


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not fit the run; the message says which and why."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / DIRNAME


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------- writing

def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh staging directory for the checkpoint of ``step``, next to where it will end up."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{step_name(step)}-", dir=root))


def commit(staging: Path, step: int, trainer_state: dict, config_text: str, keep_last: int,
           keep_policies: bool = False) -> Path:
    """Write the driver's files and the manifest into ``staging``, then rename it into place; prune old ones."""
    (staging / TRAINER_STATE).write_text(json.dumps({"format": FORMAT_VERSION, **trainer_state}, indent=1))
    (staging / "config.yaml").write_text(config_text)
    files = {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(staging.rglob("*")) if p.is_file()}
    _write_synced(staging / MANIFEST, json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))
    final = staging.parent / step_name(step)
    if final.exists():  # the same step saved again (a recovered learner redid it): replace the old one
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep_last, keep_policies)
    return final


def abort(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def prune(root: Path, keep_last: int, keep_policies: bool = False) -> None:
    """Delete all but the newest ``keep_last`` checkpoints under ``root``; with ``keep_policies`` each one's policy/
    moves to <output_dir>/policies/step-N first (a rename: the same file system)."""
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        if keep_policies and (old / "policy").is_dir():
            kept = policies_dir(root.parent) / old.name
            kept.parent.mkdir(exist_ok=True)
            if kept.exists():  # the same step kept before (a recovered learner redid it): the newer one counts
                shutil.rmtree(kept)
            os.replace(old / "policy", kept)
        shutil.rmtree(old, ignore_errors=True)


def policies_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / POLICIES_DIRNAME


def saved_policies(output_dir: str | Path) -> dict[int, Path]:
    """Step -> the policy (HF model directory) saved at that step: the kept ones (checkpoint.keep_policies) and those
    of the valid checkpoints."""
    found = {int(p.name.removeprefix("step-")): p for p in policies_dir(output_dir).glob("step-*")
             if (p / "config.json").is_file()}
    for path in sorted(checkpoints_dir(output_dir).glob("step-*")):
        if (path / MANIFEST).is_file() and (path / "policy" / "config.json").is_file():  # complete: manifest last
            found[step_of(path)] = path / "policy"
    return dict(sorted(found.items()))


def remove_partial(output_dir: str | Path) -> None:
    """Staging directories of saves that never completed (a crash mid-save)."""
    for partial in checkpoints_dir(output_dir).glob(PARTIAL_PREFIX + "*"):
        log.warning("removing %s: a checkpoint save that did not complete", partial)
        shutil.rmtree(partial, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- reading

def verify(path: str | Path) -> dict:
    """The trainer state of a complete, undamaged checkpoint; CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}: it is incomplete or damaged") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes, "
                                  f"the manifest says {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest")
    try:
        return read_state(path)
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable {TRAINER_STATE}") from None


def read_state(path: str | Path) -> dict:
    """trainer.json of a checkpoint already verified."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def saved_config(path: str | Path) -> dict:
    """A checkpoint's config tree, with the keys reshaped since it was written in their new form."""
    from rlhf_ray.config import read_yaml, upgrade_saved

    return upgrade_saved(read_yaml((Path(path) / "config.yaml").read_text()))


def step_of(path: str | Path) -> int:
    """The step a checkpoint directory ``…/step-000012`` holds."""
    return int(Path(path).name.removeprefix("step-"))


def latest_valid(output_dir: str | Path, at_most_step: int | None = None) -> Path | None:
    """The newest checkpoint in ``output_dir`` (of at most ``at_most_step`` steps) that verifies; damaged newer ones
    are skipped with a warning."""
    found = sorted(checkpoints_dir(output_dir).glob("step-*"), reverse=True)
    for candidate in [path for path in found if at_most_step is None or step_of(path) <= at_most_step]:
        try:
            verify(candidate)
            return candidate
        except CheckpointError as err:
            log.warning("%s; trying the one before", err)
    return None


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose save completed (it has its manifest: written last, then renamed into place) — what
    an error message can name at once; ``latest_valid`` also checks every hash (slow for big models)."""
    complete = [path for path in checkpoints_dir(output_dir).glob("step-*") if (path / MANIFEST).is_file()]
    return max(complete, default=None)


def resolve(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: None for a new run (or ``auto`` with nothing saved yet)."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_valid(output_dir)
        if found is None:
            log.warning("resume=auto: no valid checkpoint in %s; starting from the beginning",
                        checkpoints_dir(output_dir))
        return found
    verify(resume)
    return Path(resume)


def differences(saved: dict, current: dict, default=None) -> tuple[list[str], list[str]]:
    """(settings that forbid continuing, settings that merely changed), each as 'key: old -> new'.

    A key the saved config lacks came after the code that wrote it: ``default(key)`` (its default now; anything unequal
    to every value where there is none) is what that code ran with, since a new setting's default keeps the behaviour from before it, so
    the current value differs only where it is not that default."""
    old, new = flatten(saved), flatten(current)
    blocking, changed = [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith(NEVER_COMPARED) or old.get(key) == new.get(key):
            continue
        if key not in old and default is not None and default(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (blocking if key.startswith(MUST_MATCH) and not key.startswith(CHANGEABLE) else changed).append(line)
    return blocking, changed


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config tree as {dotted key: value} (tuples as lists; an empty mapping is a value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
