"""One typed, validated config tree per run kind: PPO (``ExperimentConfig``), reward-model training
(``RewardTrainingConfig``), SFT (``SFTConfig``) and DPO (``DPOConfig``).

Loaded from YAML (``configs/*.yaml``) with ``key=value`` overrides (dotted paths, values parsed as YAML:
``ppo.kl_coef=0.1``, ``generation.stop=['\\n\\n']``). Every field is documented once, in its section's class;
docs/config-reference.md lists them all. Unknown keys, wrong types and impossible combinations fail before anything
starts, with a one-line message naming the key. Nothing is silently rewritten.

    python -m rlhf_ray.config configs/tiny_cpu.yaml ppo.kl_coef=0.1   # prints the resolved tree
    python -m rlhf_ray.config --rm --help                             # reward-model training keys (--sft, --dpo)
    python -m rlhf_ray.config --reference > docs/config-reference.md  # every key, type, default, description

    errors        ConfigError; ConfigKeyError, the rule broken and its key; one-line messages
    sections      the sections every run kind shares (deepspeed, optimizer, lora, resources, timeouts, logging,
                  checkpoint, recovery, ray) and the top-level keys (RunConfig)
    rules         rules that span sections, each written once: batch split, lora, weight transport, reward, sampling
    reward        models.reward
    ppo_sections  the sections only PPO has; planning: what the planner assumes (lengths); ppo: ExperimentConfig
    learner_run   the top level of RM training, SFT and DPO; rm, sft, dpo: each kind
    loading       YAML, overrides, validation; reference: --help and docs/config-reference.md; cli: __main__
"""
from rlhf_ray.config.cli import main  # noqa: E402  (last: it imports the run kinds above)
from rlhf_ray.config.dpo import (DPOConfig, DPOTrainingConfig, LearnerAndReferenceResources, PreferencePairsConfig,
                                 ReferenceTimeouts)
from rlhf_ray.config.errors import ConfigError, ConfigKeyError
from rlhf_ray.config.learner_run import LearnerRunConfig, PreferenceSourcesConfig
from rlhf_ray.config.loading import (DEFAULT_CONFIG, Replacing, build_config, dump_config, load_config,
                                     load_saved_config, merge_tree, parse_overrides, read_yaml, upgrade_saved)
from rlhf_ray.config.planning import PlanningConfig
from rlhf_ray.config.ppo import NO_REFERENCE, ExperimentConfig
from rlhf_ray.config.ppo_sections import (MAX_SAMPLES_PER_PROMPT, DataConfig, GenerationConfig, LoggingConfig,
                                          ModelsConfig, PPOConfig, ResourcesConfig, TimeoutsConfig, WeightsConfig)
from rlhf_ray.config.reward import RewardConfig
from rlhf_ray.config.rm import PreferenceDataConfig, RewardTrainingConfig, RMTrainingConfig
from rlhf_ray.config.rules import check_transport_name
from rlhf_ray.config.sections import (ActorResources, CheckpointConfig, DeepSpeedConfig, LearnerResourcesConfig,
                                      LearnerTimeouts, LoRAConfig, OptimizerConfig, RayConfig, RecoveryConfig,
                                      RoleResources, RunConfig, RunLogging)
from rlhf_ray.config.sft import ConversationDataConfig, SFTConfig, SFTTrainingConfig

__all__ = [
    "ActorResources", "CheckpointConfig", "ConfigError", "ConfigKeyError", "ConversationDataConfig", "DEFAULT_CONFIG",
    "DPOConfig", "DPOTrainingConfig", "DataConfig", "DeepSpeedConfig", "ExperimentConfig", "GenerationConfig",
    "LearnerAndReferenceResources", "LearnerResourcesConfig", "LearnerRunConfig", "LearnerTimeouts", "LoRAConfig",
    "LoggingConfig", "MAX_SAMPLES_PER_PROMPT", "ModelsConfig", "NO_REFERENCE", "OptimizerConfig", "PPOConfig",
    "PlanningConfig", "PreferenceDataConfig", "PreferencePairsConfig", "PreferenceSourcesConfig", "RMTrainingConfig",
    "RayConfig", "RecoveryConfig", "ReferenceTimeouts", "Replacing", "ResourcesConfig", "RewardConfig",
    "RewardTrainingConfig", "RoleResources", "RunConfig", "RunLogging", "SFTConfig", "SFTTrainingConfig",
    "TimeoutsConfig", "WeightsConfig", "build_config", "check_transport_name", "dump_config", "load_config",
    "load_saved_config", "main", "merge_tree", "parse_overrides", "read_yaml", "upgrade_saved",
]
