from __future__ import annotations

import pickle
import re
import subprocess
import sys

import pytest
import yaml

from rlhf_ray.config import ConfigError, load_config, parse_overrides
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny_cpu.yaml"
TULU = ROOT / "configs" / "tulu25_ppo_13b.yaml"


def test_tiny_default_loads_and_derives_steps():
    cfg = load_config(TINY)
    assert cfg.models.policy == "tiny:policy"
    assert cfg.num_steps == cfg.ppo.total_episodes // cfg.ppo.rollout_batch_size >= 20


def test_tulu_recipe_matches_the_paper_settings():
    cfg = load_config(TULU)
    assert (cfg.optimizer.lr, cfg.ppo.rollout_batch_size, cfg.ppo.kl_coef) == (1e-6, 64, 0.05)
    assert (cfg.optimizer.warmup_ratio, cfg.ppo.gamma, cfg.ppo.lam) == (0.1, 1.0, 0.95)
    assert (cfg.ppo.vf_coef, cfg.ppo.clip_range, cfg.ppo.epochs) == (0.1, 0.2, 1)
    assert cfg.models.value_init == "reward" and "70b" in cfg.models.reward.model
    assert "13b" in cfg.models.value_model_path and cfg.models.reference_path == cfg.models.policy
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.eps == 1e-8
    assert cfg.resources.learner.num_gpus > 0 and cfg.deepspeed.precision == "bf16"


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["ppo.kl_coef=0.2", 'generation.stop=["\\n\\n", END]', "seed=7"])
    assert cfg.ppo.kl_coef == 0.2 and cfg.seed == 7
    assert cfg.generation.stop == ["\n\n", "END"]
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_a_mapping_override_replaces_and_a_dotted_one_merges():
    """Swapping the reward function on the command line can drop the YAML's function_kwargs."""
    smollm2 = ROOT / "configs" / "smollm2_cpu.yaml"
    assert load_config(smollm2).models.reward.function_kwargs == {"max_words": 25}
    swapped = load_config(smollm2, ["models.reward.function=rlhf_ray.rewards:char_frequency",
                                    "models.reward.function_kwargs={}"])
    assert swapped.models.reward.function_kwargs == {}
    assert load_config(smollm2, ["models.reward.function_kwargs.limit=3"]).models.reward.function_kwargs == {
        "max_words": 25, "limit": 3}
    assert load_config(smollm2, ["models.reward.function_kwargs={limit: 3}"]).models.reward.function_kwargs == {
        "limit": 3}
    # a whole section given as a mapping replaces it too: the keys it leaves out take their defaults
    assert load_config(TINY, ["ppo={kl_coef: 0.3}"]).ppo.total_episodes == 64 != load_config(TINY).ppo.total_episodes


@pytest.mark.parametrize("override, key, words", [
    (["ppo.kl_coeff=0.1"], "ppo.kl_coeff", "unknown key"),
    (["ppo.kl_coef=lots"], "ppo.kl_coef", "valid number"),
    (["ppo.clip_range=-1"], "ppo.clip_range", "greater than 0"),
    (["ppo.kl_estimator=k4"], "ppo.kl_estimator", "'k1', 'k2' or 'k3'"),
    (["ppo.micro_batch_size=3"], "ppo.micro_batch_size", "does not divide"),
    (["ppo.mini_batch_size=12"], "ppo.mini_batch_size", "does not divide the rollout"),
    (["resources.learner.num_actors=3"], "ppo.mini_batch_size", "not divisible"),
    (["models.reward.kind=function"], "models.reward.function", "module:function"),
    (["models.reward.kind=function", "models.reward.function=m:f"], "models.value_init", "needs a reward model"),
    (["resources.reward.num_actors=3"], "resources.reward.num_actors", "does not divide the rollout"),
    (["generation.temperature=0"], "generation.temperature", "must be > 0"),
    (["weights.transport=object_store", "resources.generation.num_gpus=1"], "weights.transport",
     "needs in-process CPU engines"),
    (["ppo.async_steps=-1"], "ppo.async_steps", "greater than or equal to 0"),
    (["ppo.old_logprobs=sampler", "ppo.async_steps=2"], "ppo.old_logprobs",
     "with ppo.async_steps=2 would take the ratio against the policy up to 2 updates behind"),
    (["resources.rollout_cores=1"], "resources.rollout_cores", "overlap (ppo.async_steps ≥ 1)"),
    (["weights.transport=collective", "resources.learner.num_gpus=1"], "weights.transport", "same kind of device"),
    (["weights.bucket_mb=0"], "weights.bucket_mb", "greater than 0"),
    (["weights.transport=carrier_pigeon"], "weights.transport", "or a Transport class as 'module:Class'"),
    (["weights.transport=no_such_module:Transport"], "weights.transport", "cannot import no_such_module:Transport"),
    (["weights.transport=rlhf_ray.weights:TRANSPORTS"], "weights.transport", "is not a rlhf_ray.weights.Transport"),
    (["resources.generation.sharded=true"], "resources.generation.sharded", "only the frozen roles"),
    (["resources.reward.sharded=true", "models.reward.kind=function", "models.reward.function=m:f",
      "models.value_init=policy"], "resources.reward.sharded", "only a reward model"),
    (["resources.learner.num_gpus=0.5"], "resources.learner.num_gpus", "0 or 1 whole GPU"),
    (["ppo.total_episodes=40"], "ppo.total_episodes", "silently dropped"),
    (["deepspeed.offload_params=true"], "deepspeed.offload_params", "zero_stage=3"),
    (["ppo.total_episodes=4"], "ppo.total_episodes", "no step would run"),
    (["nonsense"], "nonsense", "key=value"),
    (["resources.rollout_cores=1"], "resources.rollout_cores", "only applies when rollout and learning overlap"),
    (["ppo.advantage=ppo2"], "ppo.advantage", "unknown estimator 'ppo2'; known: gae, grpo"),
    (["ppo.advantage=rloo", "generation.n_samples_per_prompt=1"], "generation.n_samples_per_prompt", "at least 2"),
    (["ppo.dynamic_sampling=true"], "ppo.dynamic_sampling", "only a grouped estimator"),
    (["ppo.kl_in=loss"], "ppo.kl_estimator", "expected gradient of 0"),
    (["ppo.is_correction=tis", "ppo.old_logprobs=sampler"], "ppo.is_correction", "makes them the same"),
    (["ppo.overlong_buffer=100000"], "ppo.overlong_buffer", "must be below generation.max_new_tokens"),
    (["ppo.loss_aggregation=seq_sum"], "ppo.loss_aggregation", "'token_mean', 'seq_mean_token_mean' or"),
    (["weights.transport=adapter"], "weights.transport", "needs models.lora"),
    (["models.lora.rank=8", "deepspeed.zero_stage=3"], "deepspeed.zero_stage", "not supported with models.lora"),
    (["models.lora.rank=8", "models.reference=tiny:reward"], "models.reference", "leave models.reference unset"),
    (["models.lora.rank=0"], "models.lora.rank", "greater than 0"),
    (["models.lora.dropout=1"], "models.lora.dropout", "less than 1"),
])
def test_bad_values_fail_with_a_message_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    message = str(err.value)
    assert key in message and words in message, message
    assert "\n" not in message


def test_missing_section_and_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {policy: x}\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_config(bad)


@pytest.mark.e2e
def test_cli_prints_resolved_tree_or_one_line_error():
    ok = subprocess.run([sys.executable, "-m", "rlhf_ray.config", str(TULU), "ppo.kl_coef=0.1"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "kl_coef: 0.1" in ok.stdout and "value_init: reward" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "rlhf_ray.config", str(TINY), "ppo.gama=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "ppo.gama" in bad.stderr


@pytest.mark.parametrize("overrides, source", [
    ([], "sampler"),
    (["ppo.async_steps=1"], "learner"),
    (["ppo.async_steps=3"], "learner"),
    (["generation.top_p=0.9"], "learner"),
    (["models.dtype=bfloat16"], "learner"),
    (["deepspeed.precision=bf16"], "learner"),
    (["ppo.old_logprobs=learner"], "learner"),
    (["ppo.old_logprobs=sampler", "generation.top_p=0.9"], "sampler"),  # asked for: the user's call
])
def test_old_logprobs_come_from_the_sampler_only_where_they_are_the_learners(overrides, source):
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides)
    assert cfg.old_logprobs_source()[0] == source


def test_overlap_of_any_depth_weighs_the_samples_to_the_learner_and_says_how_far_behind_they_are():
    deep = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["ppo.async_steps=3"])
    assert deep.is_correction() == ("tis", "the engines sample up to 3 updates behind (ppo.async_steps=3)")
    one = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["ppo.async_steps=1"])
    assert one.old_logprobs_source() == ("learner", "the engines sample one update behind (ppo.async_steps=1)")


def test_sampler_old_logprobs_with_overlap_is_refused():
    with pytest.raises(ConfigError, match="ppo.old_logprobs"):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", ["ppo.old_logprobs=sampler", "ppo.async_steps=1"])


def test_the_tulu_suite_configs_validate_with_their_model_cards_values():
    from rlhf_ray.config import DPOConfig, SFTConfig

    sft = load_config(ROOT / "configs" / "tulu2_sft_13b.yaml", schema=SFTConfig)
    assert (sft.optimizer.lr, sft.training.batch_size, sft.optimizer.schedule, sft.optimizer.warmup_ratio,
            sft.training.epochs, sft.data.max_length) == (2e-5, 128, "linear", 0.03, 2, 8192)
    dpo = load_config(ROOT / "configs" / "tulu2_dpo_70b.yaml", schema=DPOConfig)
    assert (dpo.optimizer.lr, dpo.dpo.batch_size, dpo.optimizer.schedule, dpo.optimizer.warmup_ratio, dpo.dpo.epochs,
            dpo.dpo.beta, dpo.dpo.loss) == (5e-7, 32, "linear", 0.1, 3, 0.1, "sigmoid")
    assert dpo.resources.reference.sharded and dpo.reference_path == dpo.model
    for name, schema in [("sft_tiny_cpu", SFTConfig), ("sft_smollm2_cpu", SFTConfig), ("dpo_tiny_cpu", DPOConfig),
                         ("dpo_smollm2_cpu", DPOConfig)]:
        load_config(ROOT / "configs" / f"{name}.yaml", schema=schema)


def test_dpo_and_sft_settings_that_cannot_run_are_refused_naming_the_key():
    from rlhf_ray.config import DPOConfig, SFTConfig

    dpo = ROOT / "configs" / "dpo_tiny_cpu.yaml"
    for overrides, message in [(["dpo.loss=kto"], "dpo.loss: 'kto' is not a registered loss; known: sigmoid"),
                               (["dpo.loss=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing: dpo.loss='hinge' "
                                                                               "has no label smoothing"),
                               (["data.max_prompt_length=128"], "data.max_prompt_length: 128 leaves no room"),
                               (["dpo.micro_batch_size=5"], "dpo.micro_batch_size: 5 does not divide")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(dpo, overrides, DPOConfig)
    with pytest.raises(ConfigError, match=re.escape("training.batch_size: 16 is not divisible by "
                                                    "resources.learner.num_actors=3")):
        load_config(ROOT / "configs" / "sft_tiny_cpu.yaml", ["resources.learner.num_actors=3"], SFTConfig)


def test_a_critic_free_run_needs_no_value_model_source():
    cfg = load_config(TINY, ["models.reward.kind=function", "models.reward.function=m:f", "ppo.advantage=grpo",
                             "generation.n_samples_per_prompt=2"])
    assert not cfg.ppo.needs_critic and cfg.models.value_init == "reward"  # not refused: no critic is built


@pytest.mark.parametrize("config, schema", [("tiny_cpu", "ExperimentConfig"), ("rm_tiny_cpu", "RewardTrainingConfig"),
                                            ("sft_tiny_cpu", "SFTConfig"), ("dpo_tiny_cpu", "DPOConfig")])
def test_a_rule_shared_by_the_run_kinds_says_the_same_everywhere(config, schema):
    import rlhf_ray.config

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / f"{config}.yaml", ["resume=auto", "overwrite=true"],
                    getattr(rlhf_ray.config, schema))
    assert str(err.value) == ("invalid config: overwrite: cannot be combined with resume: resume continues the run in "
                              "output_dir, overwrite replaces it")
    with pytest.raises(ConfigError, match=r"\.micro_batch_size: 3 does not divide the per-rank batch \d+ \(= "):
        batch = {"ExperimentConfig": "ppo", "DPOConfig": "dpo"}.get(schema, "training")
        load_config(ROOT / "configs" / f"{config}.yaml", [f"{batch}.micro_batch_size=3"],
                    getattr(rlhf_ray.config, schema))


def test_a_broken_rule_carries_its_key_relative_to_the_section_that_checks_it():
    from pydantic import ValidationError

    from rlhf_ray.config import ConfigKeyError, PPOConfig

    with pytest.raises(ValidationError) as err:
        PPOConfig(advantage="ppo2")
    rule = err.value.errors()[0]["ctx"]["error"]
    assert isinstance(rule, ConfigKeyError) and rule.key == "advantage" and rule.why.startswith("unknown estimator")
    assert str(pickle.loads(pickle.dumps(rule))) == str(rule) == f"advantage: {rule.why}"
    with pytest.raises(ConfigError, match=r"^invalid config: ppo\.advantage: unknown estimator 'ppo2'"):
        load_config(TINY, ["ppo.advantage=ppo2"])  # the section's place in the tree comes from pydantic's loc


def test_every_registered_weight_transport_is_accepted():
    from rlhf_ray.config import check_transport_name
    from rlhf_ray.weights import TRANSPORTS

    assert [check_transport_name(name) for name in ["auto", *TRANSPORTS]] == ["auto", *TRANSPORTS]
    assert load_config(TINY, ["weights.transport=files"]).weight_transport() == ("files", "weights.transport")
    assert load_config(TINY).weight_transport()[0] == "object_store"


def test_the_committed_config_reference_is_current():
    """docs/config-reference.md is generated: a changed key, type, default or description must be regenerated."""
    from rlhf_ray.config.reference import REFERENCE_COMMAND, reference_markdown

    made = reference_markdown()  # what REFERENCE_COMMAND prints
    assert "| `weights.transport` | str | `\"auto\"` |" in made and "| `dpo.beta` | float | `0.1` |" in made
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == made, f"docs/config-reference.md is stale: run {REFERENCE_COMMAND}"


@pytest.mark.e2e  # a fresh interpreter: a subprocess
def test_reading_and_validating_configs_imports_no_actor_cluster_or_driver():
    """rlhf_ray.config sits below the rest: its deferred imports (estimators, transports, losses) must not reach the
    actors, the cluster or the drivers, which import the config themselves."""
    probe = ("import sys\n"
             "from rlhf_ray.config import DPOConfig, RewardTrainingConfig, SFTConfig, load_config\n"
             "load_config('configs/tiny_cpu.yaml', ['weights.transport=files', 'ppo.advantage=grpo', "
             "'generation.n_samples_per_prompt=2'])\n"
             "for name, schema in [('rm_tiny_cpu', RewardTrainingConfig), ('sft_tiny_cpu', SFTConfig), "
             "('dpo_tiny_cpu', DPOConfig)]:\n"
             "    load_config(f'configs/{name}.yaml', schema=schema)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('actors', 'ray', 'vllm', 'deepspeed') "
             "or m.startswith(('rlhf_ray.actors.', 'rlhf_ray.cluster', 'rlhf_ray.drivers'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_off_no_and_yes_are_words_in_a_config_and_booleans_still_read_them():
    """YAML 1.1 would make `off` a boolean, which a choice of words ('off', 'warn', 'stop') then refuses; the config's
    YAML has only true/false as booleans, and a boolean key still takes off/no/yes."""
    from rlhf_ray.config import load_config, read_yaml

    cfg = load_config(None, ["logging.alarms=off", "models.reward.cache=off", "logging.progress_bar=no",
                             "logging.report=yes"])
    assert (cfg.logging.alarms, cfg.models.reward.cache, cfg.logging.progress_bar, cfg.logging.report) == (
        "off", "off", False, True)
    assert read_yaml("logging:\n  alarms: off\n  progress_bar: false\n") == {"logging": {"alarms": "off",
                                                                                      "progress_bar": False}}
    assert read_yaml("[true, False, off, on, 'yes', 1, 1.5, null]") == [True, False, "off", "on", "yes", 1, 1.5, None]


def test_a_reshaped_key_is_refused_with_its_replacement_and_a_saved_config_that_has_it_still_reads(tmp_path):
    """logging.tensorboard became logging.trackers: a config that writes the old key is told what replaced it; a run's
    saved config.yaml (a checkpoint's, a finished run's) is read with the old key in its new form."""
    from rlhf_ray.config import ConfigError, load_config, load_saved_config, read_yaml, upgrade_saved

    with pytest.raises(ConfigError, match=r"logging.tensorboard: replaced by logging.trackers"):
        load_config(None, ["logging.tensorboard=false"])
    with pytest.raises(ConfigError, match=r"logging.trackers: names a tracker twice"):
        load_config(None, ["logging.trackers=[wandb, mlflow, wandb]"])
    written_before = load_config(None, ["output_dir=x", "logging.report=false"]).model_dump(mode="json")
    del written_before["logging"]["trackers"]
    for old, trackers in ((True, ["tensorboard"]), (False, [])):
        written_before["logging"]["tensorboard"] = old
        saved = tmp_path / f"{old}.yaml"
        saved.write_text(yaml.safe_dump(written_before))
        cfg = load_saved_config(saved)
        assert (cfg.logging.trackers, cfg.logging.report, cfg.output_dir) == (trackers, False, "x")
    tree = read_yaml("logging:\n  tensorboard: false\n  trackers: [mlflow]\n")
    assert upgrade_saved(tree) == {"logging": {"trackers": ["mlflow"]}}  # a saved new key wins
    assert tree == {"logging": {"tensorboard": False, "trackers": ["mlflow"]}}  # the tree read is left as it was
