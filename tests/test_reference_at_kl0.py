"""The reference at KL 0 (ppo.reference): the decision, the planner, the step's KL and timing figures, the progress bar,
the console summary and the report's KL panel. Fast: no Ray, no engines, no models loaded. The runs themselves:
tests/test_console_and_report.py (a run without a reference, 'auto') and tests/test_e2e_critic_free.py (RLOO with one
kept at kl_coef 0, 'keep')."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_ray.config import NO_REFERENCE, PPOConfig, load_config
from rlhf_ray.config.errors import ConfigError
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.drivers.ppo import PPOTrainer
from rlhf_ray.drivers.rollout import step_timing, with_advantages

ROOT = Path(__file__).resolve().parent.parent
TINY, TULU = ROOT / "configs" / "tiny_cpu.yaml", ROOT / "configs" / "tulu25_ppo_13b.yaml"


def test_the_reference_goes_only_where_the_kl_weighs_nothing_and_auto_says_so():
    source = lambda *overrides: load_config(TINY, list(overrides)).reference_source()[0]  # noqa: E731
    assert source() == "actors" and source("ppo.kl_coef=0", "ppo.reference=keep") == "actors"
    assert source("ppo.kl_coef=0") == "none" == source("ppo.kl_coef=0", "ppo.kl_in=loss", "ppo.advantage=rloo",
                                                        "generation.n_samples_per_prompt=2")
    assert load_config(TINY, ["ppo.kl_coef=0"]).reference_source()[1] == NO_REFERENCE
    # LoRA: the learner's base is the reference while the KL weighs something (or is kept), no one's at 0
    assert source("models.lora.rank=4") == "learner" == source("models.lora.rank=4", "ppo.kl_coef=0", "ppo.reference=keep")
    assert source("models.lora.rank=4", "ppo.kl_coef=0") == "none"
    with pytest.raises(ConfigError, match="ppo.reference"):
        load_config(TINY, ["ppo.reference=never"])


def test_resources_reference_is_not_checked_where_no_reference_actor_starts():
    # 3 reference actors cannot split a rollout of 16 sequences: refused only where they would start
    load_config(TINY, ["ppo.kl_coef=0", "resources.reference.num_actors=3"])
    with pytest.raises(ConfigError, match="resources.reference.num_actors"):
        load_config(TINY, ["ppo.kl_coef=0", "ppo.reference=keep", "resources.reference.num_actors=3"])


def test_the_planner_plans_no_reference_at_kl0_with_auto():
    from rlhf_ray.planning import get_hardware, plan_experiment
    from rlhf_ray.planning.planner import requested_gpus_of, resolve_models

    tulu = lambda *overrides: load_config(TULU, ["deepspeed.zero_stage=2", *overrides])  # noqa: E731
    kept, none = tulu("ppo.kl_coef=0", "ppo.reference=keep"), tulu("ppo.kl_coef=0")
    assert "reference" in resolve_models(kept) and "reference" not in resolve_models(none)
    assert requested_gpus_of(kept) == requested_gpus_of(none) + 1  # the reference's one GPU (tulu25_ppo_13b.yaml)
    h100 = get_hardware("h100-80gb")
    with_ref, without = (plan_experiment(c, h100, gpus=16, nodes=2, search=False) for c in (kept, none))
    assert any(r.role == "reference" for r in with_ref.roles) and not any(r.role == "reference" for r in without.roles)
    assert "reference" not in without.layout.nodes_of and without.to_dict()["requested_gpus"] == 14
    assert f"{NO_REFERENCE}: none planned" in without.assumptions
    assert "reference" in with_ref.phases["score"].parts and "reference" not in without.phases["score"].parts
    # LoRA at KL 0: no reference pass in the learner either
    lora = [plan_experiment(tulu("models.lora.rank=64", *o), h100, gpus=16, nodes=2, search=False).phases["score"]
            for o in ((), ("ppo.kl_coef=0",))]
    assert lora[1].parts["values"] < lora[0].parts["values"]


def rollout(ref: bool) -> RolloutBatch:
    n, mask = 2, torch.ones(2, 3)
    batch = RolloutBatch.from_samples([[1, 2]] * n, [[3, 4, 5]] * n, [[-1.0, -1.0, -1.0]] * n, ["stop"] * n,
                                      [[]] * n, [""] * n, [""] * n, pad_token_id=0)
    batch = batch.with_(scores=torch.tensor([1.0, 2.0]), old_logprobs=batch.gen_logprobs, values=torch.zeros_like(mask))
    return batch.with_(ref_logprobs=batch.gen_logprobs - 0.5) if ref else batch


def test_a_batch_without_reference_logprobs_has_no_kl_and_a_weighted_kl_needs_them():
    none, stats = with_advantages(rollout(ref=False), PPOConfig(kl_coef=0.0, non_eos_penalty=None))
    kept, kept_stats = with_advantages(rollout(ref=True), PPOConfig(kl_coef=0.0, non_eos_penalty=None))
    assert "kl/mean" not in stats and kept_stats["kl/mean"] == pytest.approx(1.5)  # 3 tokens × k1 0.5
    assert torch.equal(none.rewards, kept.rewards) and none.rewards.sum(-1).tolist() == [1.0, 2.0]  # KL weighs 0
    with pytest.raises(ValueError, match="ppo.kl_coef=0.05 weighs the KL"):
        with_advantages(rollout(ref=False), PPOConfig(kl_coef=0.05))


def test_no_reference_actor_no_reference_time_and_a_progress_bar_without_kl():
    times = {"generate": 1.0, "score_wall": 0.5, "learn": 2.0, "rollout_wait": 0.0, "weight_sync": 0.1, "step": 4.0}
    sync = {"publish": 0.05, "load": 0.05}
    timing = step_timing(times, {"reward": 0.5, "values": 0.2}, 1.0, 2.0, sync, rollout(ref=False))
    assert "time/reference" not in timing and timing["time/reward"] == 0.5
    assert step_timing(times, {"reward": 0.5, "reference": 0.4}, 1.0, 2.0, sync, rollout(ref=True))["time/reference"] == 0.4
    row = {"reward/mean": 0.5, "time/step": 4.0}
    assert PPOTrainer.progress(row) == {"reward": "0.500", "step_s": "4.0"}
    assert PPOTrainer.progress({**row, "kl/mean": 0.25})["kl"] == "0.250"


def test_the_sweep_gives_no_idle_share_to_a_role_the_run_did_not_have():
    from rlhf_ray.cli import sweep
    from tests.test_sweep import step_row

    rows = [{k: v for k, v in step_row(1.0, 0.5, 2.0).items() if k != "time/reference"}] * 2
    assert set(sweep.measure(rows, sequences=16, epochs=1)["idle_share"]) == {"generation", "reward", "learner"}


def steps_without_kl(n: int) -> list[dict]:
    from tests.test_console_and_report import fake_steps

    return [{k: v for k, v in row.items() if k != "kl/mean"} for row in fake_steps(n)]


def test_the_summary_and_the_kl_panel_say_there_was_no_reference_instead_of_drawing_zeros(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf_ray.run.report import draw, draw_kl, summary
    from tests.test_console_and_report import fake_steps

    assert summary(steps_without_kl(4)).endswith(f"; {NO_REFERENCE}: no KL")
    assert NO_REFERENCE not in summary(fake_steps(4))
    colors = ["C0", "C1"]
    texts = lambda ax: [t.get_text() for t in ax.texts]  # noqa: E731
    fig, (alone, beside, with_kl) = plt.subplots(1, 3)
    draw_kl(alone, {"run": steps_without_kl(4)}, colors)
    assert texts(alone) == [f"{NO_REFERENCE}:\nno KL to draw"] and len(alone.lines) == 0  # no KL line, no scale
    assert list(alone.get_yticks()) == [] and alone.get_title().startswith("no reference")
    draw_kl(beside, {"a": fake_steps(4), "b": steps_without_kl(4)}, colors)
    assert texts(beside) == [f"b: {NO_REFERENCE}:\nno KL to draw"] and len(beside.lines) == 1  # a's KL only
    draw_kl(with_kl, {"run": fake_steps(4)}, colors)
    assert texts(with_kl) == [] and len(with_kl.lines) == 1
    plt.close(fig)
    assert draw({"run": steps_without_kl(4)}, tmp_path / "report.png").stat().st_size > 10_000
