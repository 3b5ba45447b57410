"""A checkpoint written before the code was reshaped (issue 26, commit 0fd3a6c) resumes with today's code and
reproduces the step the old run took next: the checkpoint format and the step's maths did not change."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.e2e
OLD = ROOT / "tests" / "data" / "checkpoint_0fd3a6c"
OVERRIDES = ("models.lora.rank=4", "ppo.advantage=grpo", "generation.n_samples_per_prompt=2", "ppo.total_episodes=48",
             "checkpoint.every_steps=2", "checkpoint.keep_last=2", "logging.report=false")
NOT_REPRODUCIBLE = ("time/", "memory/", "throughput/", "perf/")  # wall clocks and process sizes


def test_a_checkpoint_of_the_old_code_resumes_and_reproduces_its_next_step(ray_session, tiny_cache, tmp_path):
    from rlhf_ray.drivers.ppo import PPOTrainer
    from rlhf_ray.run.checkpoint import verify

    checkpoint = shutil.copytree(OLD / "step-000002", tmp_path / "old" / "step-000002")
    restore_tokenizer(checkpoint / "policy", tiny_cache)
    verify(checkpoint)  # the manifest's sizes and hashes hold for every file, the restored ones too
    old_steps = [json.loads(line) for line in (OLD / "metrics.jsonl").read_text().splitlines()]
    trainer = PPOTrainer(tiny_config(tmp_path / "run", tiny_cache, *OVERRIDES, f"resume={checkpoint}"))
    try:
        assert trainer.step_count == 2
        step = trainer.step()
    finally:
        trainer.shutdown()
    expected = old_steps[2]
    compared = {k: v for k, v in expected.items() if isinstance(v, (int, float)) and not k.startswith(NOT_REPRODUCIBLE)}
    assert step["step"] == 3 and len(compared) > 20
    differ = {k: (v, step.get(k)) for k, v in compared.items()
              if step.get(k) is None or not math.isclose(step[k], v, rel_tol=1e-5, abs_tol=1e-6)}
    assert differ == {}


def restore_tokenizer(policy, tiny_cache) -> None:
    """The checkpoint's tokenizer files are not committed (their names are those of real tokenizers' files): they are
    the tiny policy's own, which rlhf_ray.models.tiny builds deterministically, and the old code's save_pretrained
    added two keys to tokenizer_config.json. Rebuilt byte for byte (the manifest's SHA-256 checks it)."""
    from rlhf_ray.models.specs import resolve_model

    tiny = Path(resolve_model("tiny:policy", tiny_cache))
    shutil.copy(tiny / "tokenizer.json", policy / "tokenizer.json")
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    config.update(is_local=True, local_files_only=False)
    (policy / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
