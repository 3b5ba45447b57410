"""The sections every run kind shares (PPO, reward-model training, SFT, DPO), declared once.

Each section checks its own keys (a key named in its errors is relative to the section; ``errors`` prefixes where
the section sits). Rules that read more than one section live in ``rules``, and the run kinds call them.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf_ray.config.errors import require

ModelDtype = Literal["float32", "bfloat16", "float16"]


class StrictSection(BaseModel):
    """A config section: unknown keys are errors, and assigning a value validates it as loading does."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRAConfig(StrictSection):
    """The policy trained as low-rank adapters on its frozen weights (PEFT): W x + (alpha / rank) · B A x."""
    rank: int = Field(16, gt=0, description="The adapters' rank r.")
    alpha: float = Field(32.0, gt=0.0, description="Scale numerator: the adapters' output is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training. Above 0 the "
                                                            "learner's log-probs in training differ from the sampler's.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="Layers that get adapters: 'all-linear' (every linear layer but the output head) or "
                                  "module names such as [q_proj, v_proj].")




class OptimizerConfig(StrictSection):
    lr: float = Field(1e-6, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of optimizer steps spent warming up.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0, description="Gradient clipping; null disables.")


class DeepSpeedConfig(StrictSection):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage of the learner. Use 0 with one learner rank: ZeRO 1-2 keep an extra fp32 copy of "
                       "weights and gradients and partition nothing. Communication buckets are sized from the model.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Learner training precision. bf16: weights and activations in bf16, fp32 master weights and "
                            "Adam states in DeepSpeed's optimizer; with zero_stage 1 gradients also accumulate in fp32 "
                            "(BF16_Optimizer), with 0 in bf16. On CPU it needs AMX, AVX512-BF16 or Arm BF16 (refused "
                            "where torch would only emulate it); pair it with models.dtype=bfloat16 for the frozen "
                            "roles and the engine (the sampler-vs-learner gap is then logged as is/mismatch_kl and "
                            "corrected by ppo.is_correction=auto).")
    offload_optimizer: bool = Field(False, description="Optimizer states in host memory (ZeRO ≥ 1).")
    offload_params: bool = Field(False, description="Parameters in host memory (ZeRO-3 only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    padding_free: bool = Field(
        True, description="Forward passes on real tokens only: each micro-batch's sequences packed into one row, "
                          "attention kept within each sequence (Hugging Face's packed position ids: a block-diagonal "
                          "mask on CPU, variable-length kernels with FlashAttention). Results equal the padded rows'. "
                          "Applies to the learner and the reference; a model that does not keep packed sequences "
                          "apart is run padded, with a warning.")
    micro_batch_tokens: Optional[int] = Field(
        None, gt=0, description="Micro-batches by tokens: each mini-batch's rows grouped into as few micro-batches of at "
                                "most this many real tokens as fit (a longer row alone), instead of the objective's "
                                "micro_batch_size rows; results are the same, memory follows the tokens. null: rows.")
    logits_chunk_tokens: Optional[int] = Field(
        None, ge=0, description="Log-probs and entropies from the LM head this many tokens at a time (recomputed in "
                                "backward), so full-vocabulary logits never exist for a whole micro-batch. null: "
                                "2^24 / vocabulary size tokens (64 MiB of fp32 logits); 0: all at once.")

    @model_validator(mode="after")
    def _check_offload(self) -> "DeepSpeedConfig":
        require(self.offload_params is False or self.zero_stage == 3, "offload_params",
                "parameter offload needs deepspeed.zero_stage=3")
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "optimizer offload needs deepspeed.zero_stage >= 1")
        return self

    def forward_options(self) -> dict:
        """rlhf_ray.models.forward.ForwardOptions' fields: how the learner's and the reference's forwards run."""
        return {"padding_free": self.padding_free, "logits_chunk_tokens": self.logits_chunk_tokens}


class ActorResources(StrictSection):
    num_actors: int = Field(1, gt=0, description="Actors of this role (learner: data-parallel world size).")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per actor (tensor_parallel_size for TP engines).")
    threads: Optional[int] = Field(
        None, gt=0, description="Torch threads of each actor in every phase; null: its node's cores shared by the roles "
                                "computing at the same time (rlhf_ray.cluster.compute; the plan is logged at startup).")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels every actor of this role must run on (Ray's bundle label "
                                          "selector, e.g. {pool: rollout}; nodes get labels with `ray start --labels`).")
    node_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor of this role reserves besides CPUs and GPUs "
                                          "(e.g. {gen_node: 1}: only nodes started with `--resources "
                                          "'{\"gen_node\": 8}'` can host it).")


class RoleResources(ActorResources):
    tensor_parallel_size: int = Field(
        1, gt=0, description="vLLM tensor parallelism inside one generation actor: its workers are processes of the "
                             "actor, on its GPUs (num_gpus ≥ tensor_parallel_size) or on CPU its cores, one or more per "
                             "worker (vLLM's VLLM_CPU_OMP_THREADS_BIND, set from the actor's CPUs).")
    sharded: bool = Field(
        False, description="reward (kind='model') and reference only: the role's num_actors actors hold ONE model "
                           "between them (ZeRO-3 inference: each keeps ~1/num_actors of the weights and gathers a layer "
                           "at a time in the forward pass), instead of a full copy each. Each still scores its own "
                           "share of the rollout, so all of them compute (a 70B RM over 4 GPUs: 4 × 1/4 of it).")


class LearnerResourcesConfig(StrictSection):
    learner: ActorResources = Field(default_factory=ActorResources)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the role bundles.")
    keep_freed_memory: bool = Field(
        True, description="Role processes keep the memory a phase freed for the next one (glibc: every tensor from "
                          "the heap, which is never trimmed): no page faults on fresh memory every step (SmolLM2's "
                          "fp32 update faulted in 0.7 GB a step without it, 5-12 % of its time); false: each phase "
                          "returns it to the OS, so resident memory drops between phases (SmolLM2's learner: ~2.4 GB), "
                          "at that cost.")
    nice: Optional[int] = Field(
        0, ge=-20, le=19, description="Scheduling priority of the role processes (Ray starts workers at nice 15, behind "
                                      "every plain process; lowering it needs the privilege to); null: leave Ray's.")

    @model_validator(mode="after")
    def _check_learner_gpus(self) -> "LearnerResourcesConfig":
        # a DeepSpeed rank drives one device; fractions or several GPUs per rank would leave devices idle or shared
        learner = self.learner
        require(learner.num_gpus in (0, 1), "learner.num_gpus", f"{learner.num_gpus}: a learner rank uses 0 or 1 whole "
                                                                "GPU (scale with resources.learner.num_actors)")
        return self


class LearnerTimeouts(StrictSection):
    placement_s: float = Field(120.0, gt=0, description="Reserving the roles' resources (raise it on autoscaling clusters).")
    startup_s: float = Field(900.0, gt=0, description="Actors start and load models (first DeepSpeed init JIT-builds ~60 s).")
    learn_s: float = Field(1800.0, gt=0, description="One learner call: an update (PPO: of one rollout, with its values and "
                                                      "old logprobs; RM training: of one batch), an evaluation or a save.")
    hang_dump_at: Optional[float] = Field(
        0.5, gt=0, lt=1, description="The hang doctor (rlhf_ray.runtime.stacks): when a wait on a role passes this "
                                     "fraction of its timeout, every actor's Python stacks go to "
                                     "<output_dir>/logs/hang-step-N.txt and one console line names the waited-on "
                                     "actor's innermost function of ours; the wait goes on. null: off.")
    hang_dump_tool: Literal["auto", "py-spy", "faulthandler"] = Field(
        "auto", description="How the stacks are read: 'py-spy' from outside the process (needs ptrace: root, or "
                            "kernel.yama.ptrace_scope 0, or CAP_SYS_PTRACE in a container), 'faulthandler' by the "
                            "process itself on SIGUSR1 (any Python frame, no native ones), 'auto': py-spy, else "
                            "faulthandler.")




class AlarmThresholds(StrictSection):
    """logging.alarm_thresholds: each rule's threshold (rlhf_ray.run.alarms); null turns that rule off."""
    kl_max: Optional[float] = Field(20.0, gt=0, description="kl_high: kl/mean (nats per response) above this.")
    length_collapse: Optional[float] = Field(
        0.33, gt=0, lt=1, description="length_collapse: response/length_mean below this fraction of its first steps'.")
    length_blowup: Optional[float] = Field(
        3.0, gt=1, description="length_blowup: response/length_mean above this multiple of its first steps'.")
    eos_collapse: Optional[float] = Field(
        0.5, gt=0, lt=1, description="eos_collapse: response/eos_fraction below this fraction of its first steps' (when "
                                     "those finished at least 10 % of their responses).")
    entropy_collapse: Optional[float] = Field(
        0.25, gt=0, lt=1, description="entropy_collapse: the policy's entropy below this fraction of its first steps'.")
    ref_logprob_drop: Optional[float] = Field(
        1.0, gt=0, description="reward_vs_reference: score/mean rising over the window while ref/logprob_mean (the "
                               "reference's log-prob per response token) falls and lies more than this many nats "
                               "below its first steps'.")
    sampler_gap_max: Optional[float] = Field(
        0.1, gt=0, description="sampler_gap_growing: kl/sampler_vs_learner (nats per token) above this and rising over "
                               "the window.")
    penalty_pays: Optional[bool] = Field(
        True, description="penalty_pays: a response cut at generation.max_new_tokens earns more (ppo.non_eos_penalty, "
                          "mode 'replace') than the median finished response.")
    baseline_steps: int = Field(3, ge=1, description="The first steps whose mean is a rule's baseline.")
    window: int = Field(5, ge=2, description="The last steps a trend (a rise, a fall) is fitted over.")


class WandbConfig(StrictSection):
    """logging.wandb: Weights & Biases (when logging.trackers holds 'wandb')."""
    project: str = Field("rlhf-ray", description="The W&B project.")
    entity: Optional[str] = Field(None, description="The W&B entity (team or user); null: the API key's default.")
    mode: Optional[Literal["online", "offline"]] = Field(
        None, description="'online': to the server as the run goes; 'offline': files under <output_dir>/wandb "
                          "(upload later with `wandb sync`); null: WANDB_MODE's, else online.")
    api_key_env: str = Field("WANDB_API_KEY", description="The environment variable that holds the API key (online).")
    init_timeout_s: float = Field(90.0, gt=0, description="Seconds W&B may take to start before it counts as "
                                                          "unreachable.")
    required: bool = Field(False, description="true: a run whose W&B cannot start or fails stops with the error.")


class MlflowConfig(StrictSection):
    """logging.mlflow: MLflow (when logging.trackers holds 'mlflow')."""
    tracking_uri: Optional[str] = Field(
        None, description="The tracking server or store ('http://host:5000', 'databricks', 'sqlite:///path.db'); null: "
                          "MLFLOW_TRACKING_URI's, else sqlite:///<output_dir>/mlflow.db.")
    experiment: Optional[str] = Field(None, description="The experiment's name; null: logging.group, else 'rlhf-ray'.")
    token_env: str = Field("MLFLOW_TRACKING_TOKEN", description="The environment variable that holds the server's "
                                                                "bearer token (when the server wants one).")
    required: bool = Field(False, description="true: a run whose MLflow cannot start or fails stops with the error.")


class RunLogging(StrictSection):
    console: Literal["quiet", "verbose"] = Field(
        "quiet", description="'quiet': the console shows startup milestones, the progress bar, the closing summary and "
                             "errors (in full, actors' tracebacks included), while the engines', Ray's and DeepSpeed's "
                             "output goes to <output_dir>/logs/ (one file per actor, driver.log for the driver); "
                             "'verbose': all of it on the console as well.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="Experiment trackers that get the config, every step's metrics, the samples "
                                     "table and the final model's location (rlhf_ray.run.trackers): 'tensorboard' "
                                     "(<output_dir>/tensorboard), 'wandb' (logging.wandb), 'mlflow' (logging.mlflow). "
                                     "A resumed or recovered run holds each step once in each. One that cannot start "
                                     "(not installed: pip install 'rlhf-ray[trackers]'; server unreachable) is one "
                                     "console line and the run goes on without it, unless it is marked required.")
    group: Optional[str] = Field(
        None, description="Runs that belong together (a sweep sets its name): the W&B group, and the MLflow "
                          "experiment unless logging.mlflow.experiment names one.")
    wandb: WandbConfig = Field(default_factory=lambda: WandbConfig())
    mlflow: MlflowConfig = Field(default_factory=lambda: MlflowConfig())
    progress_bar: bool = Field(True, description="Show a tqdm progress bar of the run's steps.")
    report: bool = Field(True, description="Draw <output_dir>/report.png at the end of the run (rlhf_ray.report).")
    trace: bool = Field(True, description="Write <output_dir>/trace.json: every actor's calls and the driver's "
                                          "phases on one time axis, in the Chrome trace-event format (Perfetto, "
                                          "chrome://tracing; rlhf_ray.run.timeline). The idle share of each role "
                                          "per step (idle/<role>) is logged either way.")
    trace_max_events: int = Field(200_000, gt=0, description="Events in trace.json before it rolls over into "
                                                             "trace-<first step>-<last step>.json and a new one "
                                                             "begins (~100 bytes each).")
    prometheus: bool = Field(True, description="Export the run's step figures (phase seconds per role, tokens/s, "
                                               "calls in flight, reward latency, weight-sync seconds and bytes, "
                                               "restarts, alarms) as Prometheus metrics through Ray's metrics agent "
                                               "(rlhf_ray.run.prometheus; names in docs/metrics.md).")
    alarms: Literal["off", "warn", "stop"] = Field(
        "warn", description="Rules over the metrics that fire while the run goes on (rlhf_ray.run.alarms: KL, "
                            "length, EOS, entropy, reward against the reference's log-prob, the sampler-learner gap, "
                            "a penalty that pays): 'warn': one console line, alarm/<rule> in the step's metrics and a "
                            "marker in the report, once per rule; 'stop': that, then the run ends with a checkpoint "
                            "(exit code 3); 'off': no rules.")
    alarm_thresholds: AlarmThresholds = Field(default_factory=lambda: AlarmThresholds())

    @model_validator(mode="after")
    def _each_tracker_once(self) -> "RunLogging":
        require(len(set(self.trackers)) == len(self.trackers), "trackers", f"names a tracker twice: {self.trackers}")
        return self




class CheckpointConfig(StrictSection):
    every_steps: int = Field(
        0, ge=0, description="Save a checkpoint every N PPO steps (0: only at the end and when stopped by a signal). "
                             "<output_dir>/checkpoints/step-NNNNNN: HF policy (safetensors), DeepSpeed state (weights, "
                             "optimizer, LR schedule, every ZeRO stage), RNGs, step, prompt position, config, manifest.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted after a newer one is complete.")
    keep_policies: bool = Field(
        False, description="When keep_last deletes a checkpoint, keep its policy/ (the HF model, without the learner "
                           "state: ~1/7 of a full-fine-tuning checkpoint) as <output_dir>/policies/step-NNNNNN, to "
                           "evaluate the run along its way (python -m rlhf_ray.compare_rewards sets it).")
    at_end: bool = Field(True, description="Save a checkpoint after the last step.")
    on_signal: bool = Field(True, description="On SIGTERM/SIGINT save a checkpoint of the last finished step before exiting.")
    on_error: bool = Field(
        True, description="When the run stops on an error (a reward endpoint unreachable past models.reward.outage_s, a "
                          "role failing for good, …), save a checkpoint of the last finished step first — if the "
                          "learner holds exactly that step: not after an error during the update or with a learner "
                          "lost, and not on a full disk (then the last checkpoint is the one to resume from; the "
                          "console says which).")


class RecoveryConfig(StrictSection):
    max_actor_restarts: int = Field(
        3, ge=0, description="Times over the run a dead or unresponsive generation, reward or reference actor is "
                             "replaced (in its placement-group bundle) and its phase redone; 0: such a death ends the run.")
    max_learner_restarts: int = Field(
        2, ge=0, description="Times over the run the learner group is restarted from the last checkpoint (or from the "
                             "start without one) when a learner rank dies; 0: such a death ends the run.")


class RayConfig(StrictSection):
    address: Optional[str] = Field(
        None, description="Ray cluster to join ('host:port', 'ray://…', 'auto'); null: the one in RAY_ADDRESS if set "
                          "(ray job submit sets it), otherwise the run starts a local Ray of its own (it never joins "
                          "another run's cluster by accident).")
    num_cpus: Optional[float] = Field(None, gt=0, description="Logical CPUs of a locally started Ray (default: the machine's CPU count; more oversubscribes).")
    loopback_only: bool = Field(
        True, description="A Ray this run starts itself (no address given) and the learner's rendezvous listen on "
                          "127.0.0.1 only; false: on the machine's network address, so that other nodes could join.")


class RunConfig(StrictSection):
    """The top-level keys every run has (PPO, reward-model training, SFT, DPO)."""
    output_dir: str = Field("runs/default", description="Metrics, TensorBoard events, logs, checkpoints and the final "
                                                         "model go here.")
    resume: Optional[str] = Field(
        None, description="'auto': continue from the latest valid checkpoint in output_dir (the one before if the latest "
                          "is damaged; a fresh start if there is none); or a checkpoint directory. null: a new run.")
    overwrite: bool = Field(False, description="Let a new run (resume: null) replace the results in a non-empty output_dir.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation (RM training: the hold-out split, "
                                     "the pair order and the new score head).")

    @model_validator(mode="after")
    def _check_resume(self) -> "RunConfig":
        require(not (self.resume and self.overwrite), "overwrite",
                "cannot be combined with resume: resume continues the run in output_dir, overwrite replaces it")
        return self


# The sections every run kind has with the same defaults, declared once and composed by each kind's top level
# (deepspeed, resources, timeouts and logging differ between PPO and the learner-only runs).
CheckpointSection = Annotated[CheckpointConfig, Field(default_factory=CheckpointConfig)]
RecoverySection = Annotated[RecoveryConfig, Field(default_factory=RecoveryConfig)]
RaySection = Annotated[RayConfig, Field(default_factory=RayConfig)]


NO_DEFAULT = object()  # field_default: no such field


def field_default(config: BaseModel, dotted: str):
    """The default, as JSON (``model_dump(mode="json")``'s form), of the field at ``dotted`` in ``config``'s tree
    (e.g. 'models.reward.judge.mode'); NO_DEFAULT where no such field is there."""
    from pydantic_core import to_jsonable_python

    *parents, name = dotted.split(".")
    node = config
    for part in parents:
        node = getattr(node, part, None)
        if not isinstance(node, BaseModel):
            return NO_DEFAULT
    field = type(node).model_fields.get(name)
    if field is None:
        return NO_DEFAULT
    return to_jsonable_python(field.get_default(call_default_factory=True))
