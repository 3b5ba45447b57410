"""The RM comparison's statistics and conclusions (rlhf_ray.evaluation.reward_comparison) on made-up evaluations."""
import pytest
import torch

from rlhf_ray.config import load_config

from rlhf_ray.evaluation.reward_comparison import (bootstrap_interval, conclusions, markdown, paired_change, peak,
                                                   prompt_means, summary)


def test_prompt_means_group_each_prompts_samples_and_refuse_a_ragged_count():
    assert prompt_means([1, 3, 5, 7], 2).tolist() == [2.0, 6.0]
    with pytest.raises(ValueError, match="5 values do not group into prompts of 2"):
        prompt_means([1, 2, 3, 4, 5], 2)


def test_the_bootstrap_interval_covers_the_mean_shrinks_with_more_prompts_and_is_seeded():
    generator = torch.Generator().manual_seed(1)
    small, large = torch.randn(30, generator=generator, dtype=torch.float64), torch.randn(
        3000, generator=generator, dtype=torch.float64)
    low, high = bootstrap_interval(small)
    assert low < float(small.mean()) < high
    assert bootstrap_interval(small) == (low, high)  # the same seed, the same interval
    large_low, large_high = bootstrap_interval(large)
    assert large_high - large_low < (high - low) / 5  # ~1/√100 as wide
    # a normal sample's 95 % interval of the mean is about ±1.96 σ/√n
    assert large_high - large_low == pytest.approx(2 * 1.96 * float(large.std()) / 3000 ** 0.5, rel=0.15)
    assert bootstrap_interval(torch.tensor([0.5], dtype=torch.float64)) == (0.5, 0.5)


def test_a_paired_change_is_tighter_than_the_two_intervals_when_prompts_differ_in_difficulty():
    difficulty = [float(i) for i in range(40)]   # prompts far apart in score
    initial = difficulty
    better = [d + 0.1 + (0.01 if i % 2 else -0.01) for i, d in enumerate(difficulty)]
    change = paired_change(better, initial, 1)
    assert change["mean"] == pytest.approx(0.1)
    assert 0 < change["low"] < 0.1 < change["high"] < 0.12  # the difficulty cancels
    alone = summary(better, 1)
    assert alone["high"] - alone["low"] > 10 * (change["high"] - change["low"])


def make_point(step, gold, proxy, kl, change_low=None, change_high=None):
    interval = 0.02
    return {"step": step, "policy": f"p{step}", "kl": {"mean": kl, "low": kl, "high": kl},
            "proxy": {"mean": proxy, "low": proxy, "high": proxy},
            "gold": {"mean": gold, "low": gold - interval, "high": gold + interval},
            "gold_change": {"mean": gold - 0.5, "low": change_low if change_low is not None else gold - 0.5 - interval,
                            "high": change_high if change_high is not None else gold - 0.5 + interval},
            "mean_tokens": 10.0, "eos_rate": 1.0}


def test_the_peak_and_the_turn_of_the_gold_curve_while_the_proxy_keeps_rising():
    rising_then_falling = [make_point(0, 0.5, 0.0, 0.0), make_point(4, 0.7, 1.0, 2.0), make_point(8, 0.6, 2.0, 5.0),
                           make_point(12, 0.4, 3.0, 9.0)]
    p = peak(rising_then_falling)
    assert (p["step"], p["kl"], p["overoptimized"], p["turned_at_step"], p["turned_at_kl"]) == (4, 2.0, True, 8, 5.0)
    # a later dip inside the peak's interval is no turn; nor is a fall where the proxy fell too
    within = [make_point(0, 0.5, 0.0, 0.0), make_point(4, 0.7, 1.0, 2.0), make_point(8, 0.69, 2.0, 5.0)]
    assert not peak(within)["overoptimized"]
    both_fall = [make_point(0, 0.5, 0.0, 0.0), make_point(4, 0.7, 1.0, 2.0), make_point(8, 0.4, 0.5, 5.0)]
    assert not peak(both_fall)["overoptimized"]
    # a tie goes to the earlier (closer to the initial policy) checkpoint
    assert peak([make_point(0, 0.5, 0, 0), make_point(4, 0.7, 1, 2), make_point(8, 0.7, 2, 4)])["step"] == 4


def test_the_best_checkpoint_is_the_highest_gold_after_step_0_and_says_whether_it_beats_the_initial_policy():
    runs = {"a": {"points": [make_point(0, 0.5, 0, 0), make_point(4, 0.6, 1, 2, change_low=0.05)]},
            "b": {"points": [make_point(0, 0.5, 0, 0), make_point(4, 0.55, 1, 1, change_low=-0.01)]},
            "failed": {"points": [], "error": "exit 1", "status": "failed"}}
    found = conclusions(runs)
    assert set(found["peaks"]) == {"a", "b"}
    assert (found["best"]["reward"], found["best"]["step"], found["best"]["improves_on_initial"]) == ("a", 4, True)
    runs["a"]["points"][1] = make_point(4, 0.6, 1, 2, change_low=-0.02)
    assert conclusions(runs)["best"]["improves_on_initial"] is False
    # only the initial policy evaluated (every run failed before its first checkpoint): no best checkpoint
    assert conclusions({"a": {"points": [make_point(0, 0.5, 0, 0)]}})["best"] is None
    report = {"config": "c.yaml", "gold": {"label": "function g"}, "runs": runs, "conclusions": conclusions(runs),
              "settings": {"prompts": 8, "prompt_files": ["held_out"], "samples_per_prompt": 2, "temperature": 1.0,
                           "max_new_tokens": 16}}
    text = markdown(report)
    assert "| a | 4 | 2.00 [2.00, 2.00] | 1.000 | 0.600 [0.580, 0.620] |" in text
    assert "| failed | – |" in text and "NOT above the initial policy" in text


def test_bad_inputs_exit_2_in_one_line_before_anything_runs(tiny_cache, tmp_path, capsys):
    import re

    from rlhf_ray.cli import compare_rewards

    out = tmp_path / "out"
    base = ["--config", "configs/tiny_cpu.yaml", "--prompts", "configs/data/tiny_prompts.jsonl", "--out", str(out),
            f"models.cache_dir={tiny_cache}", "models.value_init=policy"]
    good_gold = ["--gold", "function=rlhf_ray.rewards:char_frequency"]
    e = ["--reward", "e=function=rlhf_ray.rewards:char_frequency"]
    cases = [([*base, *good_gold, "--reward", "e"], "--reward 'e' is not NAME=SPEC"),
             ([*base, *good_gold, *e, *e], "--reward name 'e' is given twice"),
             ([*base, *good_gold, "--reward", "a/b=function=rlhf_ray.rewards:char_frequency"], "letters, digits"),
             ([*base, *good_gold, *e, "--reward-option", "x:batch_size=2"], "NAME one of the rewards \\(e\\)"),
             ([*base, *good_gold, *e, "--reward-option", "e:batch_size=0"], "--reward e: .*batch_size"),
             # valid as the base config (its tiny RM), not with a function reward: the critic has no RM to start from
             ([*base, *good_gold, *e, "models.value_init=reward"], "--reward e: the run's config: models.value_init"),
             ([*base, "--gold", f"model={tmp_path}/no_rm", *e], "--gold: .*no_rm does not exist"),
             ([*base, *good_gold, *e, "--prompts", str(tmp_path / "none.jsonl")], "none.jsonl does not exist"),
             ([*base, *good_gold, *e, "ppo.no_such_key=1"], "no_such_key")]
    for argv, message in cases:
        assert compare_rewards.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), (argv, err)
    assert not out.exists()


def test_a_runs_config_trains_from_scratch_or_resumes_a_stopped_run(tmp_path):
    """The command the harness starts each run with, read by the trainer's own config loader: a new run overwrites,
    a stopped one (same config, a checkpoint) resumes — two settings its config must not combine."""
    from rlhf_ray.cli import compare_rewards

    args = compare_rewards.parse_args(["--config", "configs/tiny_cpu.yaml", "--prompts", "p.jsonl", "--out",
                                       str(tmp_path), "--gold", "function=rlhf_ray.rewards:char_frequency",
                                       "--reward", "e=function=rlhf_ray.rewards:char_frequency",
                                       "models.value_init=policy"])
    (run,) = compare_rewards.experiments(args, load_config(args.config, args.overrides))
    path = tmp_path / "e.yaml"
    path.write_text(run.config_text)
    for resume in (False, True):
        command = compare_rewards.train_command(path, resume=resume)
        assert command[command.index("--config") + 1] == str(path)
        cfg = load_config(str(path), command[command.index("--config") + 2:])
        assert (cfg.resume, cfg.overwrite) == (("auto", False) if resume else (None, True))
        assert cfg.checkpoint.keep_policies and cfg.output_dir == str(tmp_path / "runs" / "e")
    # a run is reused or resumed when its saved config is this one: as a tree, keys added since at their defaults
    import yaml

    tree = yaml.safe_load(run.config_text)
    assert run.same_config(run.config_text)
    older = {**tree, "logging": {k: v for k, v in tree["logging"].items() if k not in ("alarms", "trace")}}
    assert run.same_config(yaml.safe_dump(older)) and yaml.safe_dump(older) != run.config_text
    assert not run.same_config(yaml.safe_dump({**tree, "seed": tree["seed"] + 1}))
    assert not run.same_config(yaml.safe_dump({**tree, "removed_since": 1})) and not run.same_config("[")
    # a run saved before logging.trackers replaced logging.tensorboard is still this run (reused, not retrained)
    written_before = {**tree, "logging": {**{k: v for k, v in tree["logging"].items() if k != "trackers"},
                                          "tensorboard": True}}
    assert run.same_config(yaml.safe_dump(written_before))
    assert not run.same_config(yaml.safe_dump({**written_before, "logging": {**written_before["logging"],
                                                                               "tensorboard": False}}))


def test_the_compared_runs_share_one_tracker_group_and_mlflow_store(tmp_path, monkeypatch):
    from rlhf_ray.cli import compare_rewards

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--config", "configs/tiny_cpu.yaml", "--prompts", "p.jsonl", "--out", str(tmp_path / "cmp"), "--gold",
            "function=rlhf_ray.rewards:char_frequency", "--reward", "e=function=rlhf_ray.rewards:char_frequency",
            "--reward", "f=function=rlhf_ray.rewards:char_frequency", "models.value_init=policy"]
    args = compare_rewards.parse_args([*argv, "logging.trackers=[wandb, mlflow]"])
    runs = compare_rewards.experiments(args, load_config(args.config, args.overrides))
    store = f"sqlite:///{(tmp_path / 'cmp' / 'mlflow.db').resolve()}"
    assert [(r.cfg.logging.group, r.cfg.logging.mlflow.tracking_uri) for r in runs] == [("cmp", store)] * 2
    args = compare_rewards.parse_args(argv)  # TensorBoard alone: the configs as before (earlier runs are reused)
    assert {r.cfg.logging.group for r in compare_rewards.experiments(args, load_config(args.config, args.overrides))
            } == {None}
