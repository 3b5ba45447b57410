"""Checkpoint files without a cluster: atomic commit, manifest verification, fallback, pruning, config
compatibility, metrics rewind and the output-dir guard."""
from __future__ import annotations

import errno
import json

import pytest

from rlhf_ray.run import checkpoint
from rlhf_ray.run.metrics import MetricsLogger
from rlhf_ray.run.preflight import PreflightError, claim_output_dir


def save(out, step: int, keep_last: int = 2, payload: bytes = b"weights"):
    staging = checkpoint.begin(out, step)
    (staging / "policy").mkdir()
    (staging / "policy" / "model.safetensors").write_bytes(payload * 100)
    return checkpoint.commit(staging, step, {"step": step}, "seed: 0\n", keep_last)


def test_commit_writes_a_manifest_last_and_verify_reads_the_state(tmp_path):
    path = save(tmp_path, 3)
    assert path == tmp_path / "checkpoints" / "step-000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"policy/model.safetensors", "trainer.json", "config.yaml"}
    assert manifest["files"]["policy/model.safetensors"]["bytes"] == 700
    assert checkpoint.verify(path)["step"] == 3
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "policy" / "model.safetensors").write_bytes(b"x" * 700), "does not match its SHA-256"),
    (lambda p: (p / "policy" / "model.safetensors").write_bytes(b"x"), "has 1 bytes, the manifest says 700"),
    (lambda p: (p / "policy" / "model.safetensors").unlink(), "policy/model.safetensors is missing"),
    (lambda p: (p / "manifest.json").unlink(), "no readable manifest.json"),
])
def test_damage_is_detected_and_auto_resume_falls_back_to_the_one_before(tmp_path, damage, message, caplog):
    save(tmp_path, 2)
    latest = save(tmp_path, 4)
    damage(latest)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.verify(latest)
    assert checkpoint.resolve("auto", tmp_path) == tmp_path / "checkpoints" / "step-000002"
    assert message in caplog.text and "trying the one before" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.resolve(str(latest), tmp_path)  # an explicit path is not replaced by another


def test_resume_without_checkpoints_and_a_missing_path(tmp_path, caplog):
    assert checkpoint.resolve(None, tmp_path) is None
    assert checkpoint.resolve("auto", tmp_path) is None and "starting from the beginning" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.resolve(str(tmp_path / "nope"), tmp_path)


def test_keep_last_prunes_only_after_a_newer_one_is_complete(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-000003", "step-000004"]


def test_keep_policies_keeps_each_pruned_checkpoints_policy_and_lists_every_saved_policy(tmp_path):
    for step in (2, 4, 6):
        staging = checkpoint.begin(tmp_path, step)
        (staging / "policy").mkdir()
        (staging / "policy" / "config.json").write_text(f'{{"step": {step}}}')
        (staging / "learner").mkdir()
        (staging / "learner" / "state.pt").write_bytes(b"optimizer" * 100)
        checkpoint.commit(staging, step, {"step": step}, "seed: 0\n", keep_last=1, keep_policies=True)
    kept = tmp_path / "policies"
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step-*"))] == ["step-000006"]
    assert sorted(p.name for p in kept.iterdir()) == ["step-000002", "step-000004"]
    assert not (kept / "step-000002" / "learner").exists()  # the policy alone, no optimizer state
    assert {s: json.loads((p / "config.json").read_text())["step"] for s, p in checkpoint.saved_policies(
        tmp_path).items()} == {2: 2, 4: 4, 6: 6}
    # an incomplete checkpoint (no manifest yet) is no saved policy
    (tmp_path / "checkpoints" / "step-000006" / "manifest.json").unlink()
    assert list(checkpoint.saved_policies(tmp_path)) == [2, 4]


def test_a_failed_save_full_disk_leaves_the_earlier_checkpoints_valid(tmp_path, monkeypatch):
    good = save(tmp_path, 2)
    staging = checkpoint.begin(tmp_path, 4)
    (staging / "half-written").write_bytes(b"...")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_synced", disk_full)
    with pytest.raises(OSError, match="No space left"):
        try:
            checkpoint.commit(staging, 4, {"step": 4}, "", 2)
        except OSError:
            checkpoint.abort(staging)  # what PPOTrainer.save_checkpoint does
            raise
    assert checkpoint.latest_valid(tmp_path) == good
    assert not staging.exists()


def test_partial_saves_of_a_crashed_run_are_removed(tmp_path, caplog):
    save(tmp_path, 2)
    partial = checkpoint.begin(tmp_path, 4)  # a crash mid-save leaves this behind
    checkpoint.remove_partial(tmp_path)
    assert not partial.exists() and "did not complete" in caplog.text
    assert checkpoint.latest_valid(tmp_path).name == "step-000002"


def test_a_restarted_learner_continues_from_the_newest_checkpoint_of_the_steps_done(tmp_path):
    """Recovery: a run resumed from another run's checkpoint continues from that one until it saves its own; a stale
    checkpoint of more steps than the run has done (an earlier run in the same directory) is never taken."""
    from types import SimpleNamespace

    from rlhf_ray.drivers.base import CheckpointedDriver

    other = save(tmp_path / "other", 6)
    out = tmp_path / "run"
    driver = CheckpointedDriver()
    driver.cfg, driver.resume_from, driver.step_count = SimpleNamespace(output_dir=out), other, 8
    assert driver.recovery_checkpoint() == other
    own = save(out, 7, keep_last=3)
    stale = save(out, 12, keep_last=3)
    assert driver.recovery_checkpoint() == own and checkpoint.latest_valid(out) == stale
    driver.resume_from = None
    assert driver.recovery_checkpoint() == own
    renamed = other.rename(tmp_path / "backup-of-step-six")  # resume= may name any checkpoint directory
    driver.resume_from, driver.step_count = renamed, 6
    assert driver.recovery_checkpoint() == renamed
    assert checkpoint.step_of(stale) == 12


def test_config_differences_split_into_blocking_and_merely_changed():
    saved = {"seed": 0, "output_dir": "a", "models": {"policy": "x", "cache_dir": "c1"},
             "ppo": {"rollout_batch_size": 16, "kl_coef": 0.05}, "timeouts": {"learn_s": 10}}
    same = {**saved, "output_dir": "b", "models": {"policy": "x", "cache_dir": "c2"}}
    assert checkpoint.differences(saved, same) == ([], [])
    other = {**saved, "models": {"policy": "y", "cache_dir": "c1"},
             "ppo": {"rollout_batch_size": 32, "kl_coef": 0.1}, "timeouts": {"learn_s": 20}}
    blocking, changed = checkpoint.differences(saved, other)
    assert blocking == ["models.policy: 'x' -> 'y'", "ppo.rollout_batch_size: 16 -> 32"]
    assert changed == ["ppo.kl_coef: 0.05 -> 0.1", "timeouts.learn_s: 10 -> 20"]
    # SFT / DPO: the batch geometry, the learner's ranks, LoRA and the reference whose log-probs the checkpoint keeps
    dpo = {"model": "m", "reference": None, "lora": None, "dpo": {"batch_size": 16, "beta": 0.1},
           "resources": {"learner": {"num_actors": 1, "num_cpus": 1}}}
    other = {**dpo, "reference": "r", "lora": {"rank": 8}, "dpo": {"batch_size": 32, "beta": 0.2},
             "resources": {"learner": {"num_actors": 2, "num_cpus": 2}}}
    blocking, changed = checkpoint.differences(dpo, other)
    assert sorted(line.split(":")[0] for line in blocking) == ["dpo.batch_size", "lora.rank", "reference",
                                                               "resources.learner.num_actors"]
    assert [line.split(":")[0] for line in changed] == ["dpo.beta", "resources.learner.num_cpus"]


def test_rewind_keeps_each_step_once(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in (1, 2, 3, 4):
            log.log({"step": step, "x": float(step)})
            log.log_samples([{"step": step, "prompt": "p"}])
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 5, "x"')  # a line cut off by a crash
    with MetricsLogger(tmp_path, resume_step=2) as log:
        log.log({"step": 3, "x": 30.0})
        log.rewind(1)
        log.log({"step": 2, "x": 20.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 20.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1]


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    claim_output_dir(tmp_path, None, False)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(PreflightError, match=r"already holds a run \(metrics.jsonl, checkpoints\): resume=auto"):
        claim_output_dir(tmp_path, None, False)
    claim_output_dir(tmp_path, "auto", False)
    assert (tmp_path / "metrics.jsonl").exists()
    for name in ("trace.json", "trace-1-40.json", "trace-resumed-0.json", "timeline.png"):  # the timeline's too
        (tmp_path / name).write_text("{}")
    (tmp_path / "policies" / "step-000005").mkdir(parents=True)  # checkpoint.keep_policies
    claim_output_dir(tmp_path, None, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_setting_added_after_the_checkpoint_is_no_difference_at_its_default():
    """A checkpoint written before a key existed resumes when the key holds its default (what that code ran with), and
    is still blocked when the key was changed from it."""
    from rlhf_ray.config import load_config
    from rlhf_ray.config.sections import field_default
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [])
    current = cfg.model_dump(mode="json")
    saved = json.loads(json.dumps(current))
    del saved["models"]["reward"]["judge"], saved["models"]["reward"]["cache"]   # as an older release wrote it
    default = lambda key: field_default(cfg, key)  # noqa: E731
    assert checkpoint.differences(saved, current, default) == ([], [])
    assert field_default(cfg, "models.reward.judge.mode") == "pointwise" and field_default(cfg, "no.such") is not None
    judged = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["models.reward.judge.mode=pairwise"])
    blocking, _ = checkpoint.differences(saved, judged.model_dump(mode="json"), lambda key: field_default(judged, key))
    assert blocking == ["models.reward.judge.mode: None -> 'pairwise'"]
    _, changed = checkpoint.differences(saved, load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        "models.reward.cache=disk"]).model_dump(mode="json"), default)
    assert changed == ["models.reward.cache: None -> 'disk'"]
