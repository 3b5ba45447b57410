"""Experiment trackers (``logging.trackers``): TensorBoard, Weights & Biases and MLflow, one small class each in
``TRACKERS``. Each gets the run's config when it starts, every step's metrics (alarms included: ``alarm/<rule>``),
and at the end the samples table and the final model's location.

Each step once, with the values of the step that counted. A resumed run, and a learner group restarted from a
checkpoint, redo the steps after that checkpoint — and trackers do not rewind: W&B drops a step that goes backwards
(the first, discarded values stay), MLflow appends a second value to the step. So every start of a tracker's record
(the run's start, a resume, a learner restart) is a new record:

- TensorBoard: its own rewind, ``purge_step`` (the events after the checkpoint's step are hidden);
- W&B and MLflow: a new run (same name, group, config) that first gets the steps kept so far replayed —
  metrics.jsonl, already cut at the checkpoint's step — after which the earlier run is deleted (W&B offline: its
  directory under <output_dir>/wandb; W&B online: through its API; MLflow: ``delete_run``, which ``mlflow gc``
  purges). The ids in use are kept in <output_dir>/trackers.json for the next start.

A tracker that cannot start (not installed, no credentials, a server that does not answer) or that fails later is one
console line, and the run goes on without it — unless its ``required`` is true: then the run stops with the error.
TensorBoard (a dependency, local files) always counts as required.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.run.checkpoint import flatten

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
INSTALL_HINT = "pip install 'rlhf-ray[trackers]'"


class TrackerError(RuntimeError):
    """A required tracker could not start or failed."""


@dataclass
class RunInfo:
    """What every tracker names its record by."""
    output_dir: Path
    name: str             # the output dir's name
    group: str | None     # logging.group
    config: dict          # the run's config (JSON-able)


class Tracker:
    """One tracker: ``start`` a new record (replaying ``kept`` steps, deleting ``previous``, the last record's state),
    ``log`` a step, ``finish`` (samples, final model), ``close``. ``required``: its failure stops the run."""
    required = False

    def __init__(self, settings, run: RunInfo):
        self.settings, self.run = settings, run
        self.required = bool(getattr(settings, "required", self.required))

    def start(self, kept: list[dict], kept_up_to: int, previous: dict | None) -> dict:
        """Open a new record holding ``kept`` (the steps ≤ ``kept_up_to``); returns its state for trackers.json."""
        raise NotImplementedError

    def log(self, metrics: dict) -> None:
        raise NotImplementedError

    def finish(self, samples: list[dict], final_model: str | None) -> None:
        """The run ended normally: the samples table and where the final model is."""

    def close(self) -> None:
        raise NotImplementedError

    def where(self) -> str | None:
        """Where its record is, for the run's closing lines."""
        return None


def numbers(metrics: dict) -> dict[str, float]:
    """The step's numeric metrics, without ``step``."""
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def samples_table(samples: list[dict]) -> tuple[list[str], list[list]]:
    """Rows of samples.jsonl as (columns, rows): every key seen, in order; values other than numbers and strings as
    JSON text."""
    columns: list[str] = []
    for sample in samples:
        columns += [key for key in sample if key not in columns]

    def cell(value):
        return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)

    return columns, [[cell(sample.get(column)) for column in columns] for sample in samples]


# ------------------------------------------------------------------------------------------------ TensorBoard

class TensorBoardTracker(Tracker):
    """<output_dir>/tensorboard: events per step; a restart hides the events after the kept step (purge_step)."""
    required = True
    writer = None

    def start(self, kept, kept_up_to, previous):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run.output_dir / "tensorboard"), purge_step=kept_up_to + 1)
        return {}

    def log(self, metrics):
        for key, value in numbers(metrics).items():
            self.writer.add_scalar(key, value, int(metrics["step"]))

    def finish(self, samples, final_model):
        if final_model:
            self.writer.add_text("final_model", final_model)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------------------------- W&B

class WandbTracker(Tracker):
    """A W&B run per record (logging.wandb): config, ``run.log(metrics, step=…)``, a ``samples`` table and
    ``final_model`` in the summary. Offline, its files are <output_dir>/wandb/offline-run-*-<id> (``wandb sync``)."""
    wandb_run = None

    def start(self, kept, kept_up_to, previous):
        import wandb

        settings = self.settings
        key = os.environ.get(settings.api_key_env)
        run = wandb.init(
            project=settings.project, entity=settings.entity, mode=settings.mode, group=self.run.group,
            name=self.run.name, id=uuid.uuid4().hex[:12], config=self.run.config, dir=str(self.run.output_dir),
            reinit="create_new", resume="never",
            settings=wandb.Settings(init_timeout=settings.init_timeout_s, console="off", silent=True,
                                    **({"api_key": key} if key else {})))
        self.wandb_run = run
        for metrics in kept:
            self.log(metrics)
        state = {"id": run.id, "project": run.project, "entity": None if run.offline else run.entity,
                 "offline": bool(run.offline)}
        if previous:
            self._delete(previous)
        return state

    def _delete(self, previous: dict) -> None:
        """The earlier record of this run: its offline directories, or the run on the server."""
        if previous.get("offline"):
            for directory in (self.run.output_dir / "wandb").glob(f"offline-run-*-{previous['id']}"):
                shutil.rmtree(directory, ignore_errors=True)
            return
        import wandb

        path = f"{previous.get('entity')}/{previous.get('project')}/{previous['id']}"
        try:
            wandb.Api().run(path).delete()
        except Exception as err:  # the new record is complete; the old one is only stale
            log.warning("W&B: could not delete the earlier run %s of this output dir (%s); the new run %s holds every "
                        "step once, delete that one by hand", path, err, self.wandb_run.id)

    def log(self, metrics):
        self.wandb_run.log(numbers(metrics), step=int(metrics["step"]))

    def finish(self, samples, final_model):
        import wandb

        if samples:
            columns, rows = samples_table(samples)
            self.wandb_run.log({"samples": wandb.Table(columns=columns, data=rows)})
        if final_model:
            self.wandb_run.summary["final_model"] = final_model

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def where(self):
        run = self.wandb_run
        if run is None:
            return None
        if run.offline:
            return f"W&B offline run {run.id}: {run.dir.rstrip('/').removesuffix('/files')} (upload: wandb sync)"
        return f"W&B run {run.url}"


# ---------------------------------------------------------------------------------------------------- MLflow

METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. /]")  # the characters MLflow's metric and param names may hold
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_PARAM_CHARS = 1000, 100, 6000


class MlflowTracker(Tracker):
    """An MLflow run per record (logging.mlflow) in the experiment logging.mlflow.experiment (else logging.group,
    else 'rlhf-ray'): the config as params (dotted keys) and as config.yaml, the metrics per step, samples.json
    (a table) and the ``final_model`` tag. Store: logging.mlflow.tracking_uri, else MLFLOW_TRACKING_URI's, else
    sqlite:///<output_dir>/mlflow.db (artifacts: <output_dir>/mlartifacts)."""
    client = run_id = None
    status = "KILLED"  # until finish: a run that stopped or failed

    def start(self, kept, kept_up_to, previous):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its notes on creating the tables
        uri = self.tracking_uri()
        token = os.environ.get(self.settings.token_env)
        if token:  # MLflow's HTTP client reads its bearer token from there
            os.environ["MLFLOW_TRACKING_TOKEN"] = token
        if uri.startswith(("http://", "https://")):
            answering(uri)
        self.client = client = MlflowClient(tracking_uri=uri)
        name = self.settings.experiment or self.run.group or "rlhf-ray"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, artifact_location=local_artifacts(uri))
        run = client.create_run(experiment_id, run_name=self.run.name, tags={
            "rlhf_ray.output_dir": str(self.run.output_dir.resolve()), **({"rlhf_ray.group": self.run.group}
                                                                          if self.run.group else {})})
        self.run_id = run.info.run_id
        params = [Param(metric_name(key), str(value)[:MAX_PARAM_CHARS])
                  for key, value in flatten(self.run.config).items()]
        for first in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=params[first:first + MAX_PARAMS_PER_BATCH])
        import yaml

        client.log_text(self.run_id, yaml.safe_dump(self.run.config, sort_keys=False), "config.yaml")
        self._log_steps(kept)
        if previous and previous.get("run_id") and previous.get("tracking_uri") == uri:
            client.delete_run(previous["run_id"])
        return {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": experiment_id}

    def tracking_uri(self) -> str:
        return (self.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.run.output_dir / 'mlflow.db').resolve()}")

    def _log_steps(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        batch: list = []
        for metrics in rows:
            stamp = int(time.time() * 1000)
            batch += [Metric(metric_name(key), value, stamp, int(metrics["step"]))
                      for key, value in numbers(metrics).items() if math.isfinite(value)]
            while len(batch) >= MAX_METRICS_PER_BATCH:
                self.client.log_batch(self.run_id, metrics=batch[:MAX_METRICS_PER_BATCH])
                batch = batch[MAX_METRICS_PER_BATCH:]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log(self, metrics):
        self._log_steps([metrics])

    def finish(self, samples, final_model):
        if samples:
            columns, rows = samples_table(samples)
            self.client.log_table(self.run_id, {column: [row[i] for row in rows] for i, column in enumerate(columns)},
                                  "samples.json")
        if final_model:
            self.client.set_tag(self.run_id, "final_model", final_model)
        self.status = "FINISHED"

    def close(self):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, self.status)
            self.run_id = None

    def where(self):
        return f"MLflow run {self.run_id} in {self.tracking_uri()}" if self.run_id else None


def local_artifacts(uri: str) -> str | None:
    """Where a local SQLite store's new experiment keeps its artifacts: beside the database (``mlartifacts/``), not in
    ./mlruns of whatever directory the run was started from (MLflow's default). None: the server's choice."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def metric_name(key: str) -> str:
    return METRIC_NAME.sub("_", key)


def answering(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server answers at ``uri`` (its /health), or ConnectionError — at once, where MLflow's own client
    would retry for minutes."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as err:
        raise ConnectionError(f"the MLflow server at {uri} does not answer ({type(err).__name__})") from None


def grouped(logging_cfg, out: Path) -> dict[str, str]:
    """Settings (dotted logging keys -> values) that put runs launched together under ``out`` (a sweep's points, a
    reward comparison's runs) into one group: logging.group, unless set, is ``out``'s name; and MLflow, unless a store
    is named, writes to one store beside them (<out>/mlflow.db), so that its experiment holds them all. Nothing when
    no tracker but TensorBoard is on."""
    if not any(name != "tensorboard" for name in logging_cfg.trackers):
        return {}
    settings = {} if logging_cfg.group else {"logging.group": Path(out).resolve().name}
    if ("mlflow" in logging_cfg.trackers and logging_cfg.mlflow.tracking_uri is None
            and not os.environ.get("MLFLOW_TRACKING_URI")):
        settings["logging.mlflow.tracking_uri"] = f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"
    return settings


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MlflowTracker}


# ---------------------------------------------------------------------------------------------- the run's set

class Trackers:
    """The run's trackers (``logging.trackers``), their records' state in <output_dir>/trackers.json, and what a
    failure does: one line and the run goes on without that tracker, or TrackerError where it is required."""

    def __init__(self, logging_cfg, run: RunInfo):
        self.run = run
        self.active = [TRACKERS[name](getattr(logging_cfg, name, None), run) for name in logging_cfg.trackers]
        self.names = {id(tracker): name for tracker, name in zip(self.active, logging_cfg.trackers)}

    def start(self, kept: list[dict], kept_up_to: int) -> None:
        """A new record in each tracker, holding the ``kept`` steps (≤ ``kept_up_to``); the earlier ones deleted."""
        path = self.run.output_dir / STATE_FILE
        try:
            state = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            state = {}
        for tracker in list(self.active):
            name = self.names[id(tracker)]
            self._guard(tracker, "could not start",
                        lambda: state.__setitem__(name, tracker.start(kept, kept_up_to, state.get(name))))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    def log(self, metrics: dict) -> None:
        for tracker in list(self.active):
            self._guard(tracker, "failed", lambda: tracker.log(metrics))

    def finish(self, samples: list[dict], final_model: str | None) -> None:
        for tracker in list(self.active):
            self._guard(tracker, "failed", lambda: tracker.finish(samples, final_model))

    def where(self) -> list[str]:
        return [where for where in (tracker.where() for tracker in self.active) if where]

    def close(self) -> None:
        """Close every tracker even if one fails; then raise the first failure of a required one."""
        failure = None
        for tracker in self.active:
            try:
                tracker.close()
            except Exception as err:
                if tracker.required:
                    failure = failure or err
                else:
                    log.warning("%s: closing failed: %s", self.names[id(tracker)], err)
        if failure is not None:
            raise failure

    def _guard(self, tracker: Tracker, what: str, action) -> bool:
        """Run ``action``; a failure drops the tracker with one line (returns True), or stops a required one."""
        try:
            action()
            return False
        except Exception as err:
            name = self.names[id(tracker)]
            why = f"not installed ({INSTALL_HINT})" if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
            if tracker.required:
                raise TrackerError(f"tracker {name} {what}: {why}") from err
            log.warning("tracker %s %s: %s; the run goes on without it (logging.%s.required=true stops it instead)",
                        name, what, first_line(why), name)
            self.active.remove(tracker)
            try:
                tracker.close()
            except Exception:  # already failing: its record is left as it is
                pass
            return True


def first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:limit]
