"""The trackers with the real libraries, offline (rlhf_ray.run.trackers): TensorBoard, W&B in offline mode, MLflow on a
local SQLite store. A run is interrupted, resumed at a checkpoint's step, has its learner group restarted from an
earlier one, and finishes: each tracker then holds every step once, with the values of the step that counted, the
config, the samples table and the final model's location. And a tracker that cannot start is one line (the run goes
on) unless it is required. (Marked e2e: W&B starts its own service process.)"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.run.metrics import MetricsLogger
from rlhf_ray.run.trackers import RunInfo, TrackerError, Trackers

pytestmark = pytest.mark.e2e


def trackers_for(out: Path, *overrides: str) -> Trackers:
    cfg = load_config(None, [f"output_dir={out}", "logging.wandb.mode=offline", "logging.group=sweep-a", *overrides])
    return Trackers(cfg.logging, RunInfo(out, out.name, cfg.logging.group, cfg.model_dump(mode="json")))


def step(n: int, x: float) -> dict:
    return {"step": n, "x": x, "idle/generation": 0.5, "alarm/kl_high": None, "phase": "text is not a metric"}


def test_every_step_once_across_a_resume_and_a_learner_restart_in_each_tracker(tmp_path):
    out = tmp_path / "run"
    names = "logging.trackers=[tensorboard, wandb, mlflow]"
    with MetricsLogger(out, trackers_for(out, names), resume_step=0) as log:  # the first start; stopped after 4 steps
        for n in (1, 2, 3, 4):
            log.log(step(n, float(n)))
            log.log_samples([{"step": n, "prompt": f"p{n}", "response": "r", "score": n / 10}])
    with MetricsLogger(out, trackers_for(out, names), resume_step=2) as log:  # resumed from the step-2 checkpoint
        log.log(step(3, 30.0))
        log.rewind(1)  # a learner restart back to the step-1 checkpoint
        for n in (2, 3):
            log.log(step(n, 100.0 * n))
            log.log_samples([{"step": n, "prompt": f"again p{n}", "response": "r", "score": 1.0}])
        where = log.finish(final_model=str(out / "final_model"))
    counted = {1: 1.0, 2: 200.0, 3: 300.0}

    assert [line.split(" ")[0] for line in where] == ["W&B", "MLflow"]
    state = json.loads((out / "trackers.json").read_text())
    assert set(state) == {"tensorboard", "wandb", "mlflow"}

    # W&B offline: one record left (the two earlier ones deleted), the counted steps once each
    records = list((out / "wandb").glob("offline-run-*"))
    assert [path.name.rsplit("-", 1)[1] for path in records] == [state["wandb"]["id"]]
    run = read_wandb(next(records[0].glob("run-*.wandb")))
    assert run["history_steps"] == [1, 2, 3]
    assert {s: values["x"] for s, values in run["history"].items()} == counted
    assert run["history"][1]["idle/generation"] == 0.5 and "alarm/kl_high" not in run["history"][1]
    assert run["config"]["logging"]["trackers"] == ["tensorboard", "wandb", "mlflow"]
    assert (run["group"], run["name"]) == ("sweep-a", "run")
    assert run["summary"]["final_model"] == str(out / "final_model")
    assert run["samples_rows"] == 3  # samples.jsonl as kept: steps 1, 2, 3 of the run that counted

    # MLflow: one live run in the group's experiment, the earlier two deleted; the counted steps once each
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("sweep-a")
    live = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    deleted = client.search_runs([experiment.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in live] == [state["mlflow"]["run_id"]] and len(deleted) == 2
    history = client.get_metric_history(state["mlflow"]["run_id"], "x")
    assert sorted((m.step, m.value) for m in history) == sorted(counted.items())
    assert [m.step for m in client.get_metric_history(state["mlflow"]["run_id"], "idle/generation")] == [1, 2, 3]
    info = live[0]
    assert info.info.status == "FINISHED" and info.data.tags["final_model"] == str(out / "final_model")
    assert info.data.params["logging.wandb.mode"] == "offline" and info.info.run_name == "run"
    artifacts = {a.path for a in client.list_artifacts(info.info.run_id)}
    assert {"config.yaml", "samples.json"} <= artifacts
    assert (out / "mlartifacts").is_dir() and not Path("mlruns").exists()  # beside the store, not in the cwd
    table = json.loads(Path(client.download_artifacts(info.info.run_id, "samples.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 3

    # TensorBoard: its purge_step hides the redone steps' first values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("x")} == counted
    assert sorted(e.step for e in events.Scalars("x")) == [1, 2, 3]


def test_a_tracker_that_cannot_start_is_one_line_and_the_run_goes_on_unless_required(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="rlhf_ray.run.trackers")
    unreachable = "logging.mlflow.tracking_uri=http://127.0.0.1:9"  # (port 9, discard: nothing listens here)
    trackers = trackers_for(tmp_path / "a", "logging.trackers=[mlflow, tensorboard]", unreachable)
    with MetricsLogger(tmp_path / "a", trackers, resume_step=0) as log:
        log.log(step(1, 1.0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "tracker mlflow could not start" in lines[0] and "does not answer" in lines[0]
    assert "the run goes on without it" in lines[0]
    assert [type(t).__name__ for t in trackers.active] == ["TensorBoardTracker"]
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 1

    with pytest.raises(TrackerError, match=r"tracker mlflow could not start: ConnectionError: the MLflow server"):
        MetricsLogger(tmp_path / "b", trackers_for(tmp_path / "b", "logging.trackers=[mlflow]", unreachable,
                                                   "logging.mlflow.required=true"), resume_step=0)

    caplog.clear()
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # not installed
    with MetricsLogger(tmp_path / "c", trackers_for(tmp_path / "c", "logging.trackers=[wandb]"), resume_step=0):
        pass
    assert [r.getMessage() for r in caplog.records] == [
        "tracker wandb could not start: not installed (pip install 'rlhf-ray[trackers]'); the run goes on without it "
        "(logging.wandb.required=true stops it instead)"]


def test_wandb_online_with_no_server_gives_up_at_its_timeout(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RLHF_TEST_WANDB_KEY", "k" * 40)
    caplog.set_level(logging.WARNING, logger="rlhf_ray.run.trackers")
    trackers = trackers_for(tmp_path, "logging.trackers=[wandb]", "logging.wandb.mode=online",
                            "logging.wandb.init_timeout_s=3", "logging.wandb.api_key_env=RLHF_TEST_WANDB_KEY")
    with MetricsLogger(tmp_path, trackers, resume_step=0) as log:
        log.log(step(1, 1.0))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rlhf_ray")]  # (W&B's own: its debug.log)
    assert len(lines) == 1 and lines[0].startswith("tracker wandb could not start: CommError") and not trackers.active


def assert_each_step_once_in_the_trackers(out: Path, keys: tuple[str, ...] = ("score/mean", "loss/policy")) -> None:
    """A real run's W&B offline record and MLflow run (rlhf_ray.run.trackers) hold each step of its metrics.jsonl once,
    with its values: one W&B record left, one live MLflow run (the earlier ones deleted)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    state = json.loads((out / "trackers.json").read_text())
    records = list((out / "wandb").glob("offline-run-*"))
    assert len(records) == 1, records
    run = read_wandb(next(records[0].glob("run-*.wandb")))
    assert run["history_steps"] == sorted(rows)
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    live = client.search_runs([state["mlflow"]["experiment_id"]], run_view_type=ViewType.ACTIVE_ONLY)
    assert [r.info.run_id for r in live] == [state["mlflow"]["run_id"]]
    for key in keys:
        assert {s: run["history"][s][key] for s in rows} == {s: row[key] for s, row in rows.items()}, key
        history = client.get_metric_history(state["mlflow"]["run_id"], key)
        assert sorted((m.step, m.value) for m in history) == sorted((s, row[key]) for s, row in rows.items()), key


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """DeepSpeed's autotuner imports mlflow when it is installed (1.5 s and more on every learner's start): the
    learner, the sharded roles and the driver import DeepSpeed through rlhf_ray.runtime.builds.import_deepspeed."""
    import subprocess
    import sys

    code = ("import sys; from rlhf_ray.runtime.builds import import_deepspeed; ds = import_deepspeed(); "
            "assert 'mlflow' not in sys.modules and ds is sys.modules['deepspeed']; "
            "import deepspeed.autotuning.autotuner as a; assert not a.has_mlflow; "
            "import mlflow; print('mlflow', mlflow.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "mlflow 3." in done.stdout, done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ a W&B file

def read_wandb(path: Path) -> dict:
    """What an offline W&B run file holds: its run record (config, group, name), the history rows by step, the
    summary's last values. The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers, records split
    across blocks) of wandb_internal_pb2.Record messages after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    out = {"history": {}, "history_steps": [], "summary": {}, "samples_rows": None}
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            read_record(record, out)
    return out


def read_record(record, out: dict) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        out["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        out["group"], out["name"] = record.run.run_group, record.run.display_name
    elif kind == "history":
        step = record.history.step.num
        out["history_steps"].append(step)
        items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        if "samples/nrows" in items:  # the samples table (logged at the end, into the last step's row)
            out["samples_rows"] = json.loads(items["samples/nrows"])
        out["history"][step] = {key: json.loads(value) for key, value in items.items()
                                if not key.startswith(("_", "samples/"))}
    elif kind == "summary":
        for item in record.summary.update:
            out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
