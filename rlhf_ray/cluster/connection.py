"""The run's Ray: join the cluster it is given, or start a local one of its own (loopback only, reaped with the run),
and know when that local Ray has gone down under the run."""
from __future__ import annotations

import logging
import os

import ray

from rlhf_ray.cluster import reaper
from rlhf_ray.config import ExperimentConfig
from rlhf_ray.runtime.signals import STOP_SIGNALS

log = logging.getLogger("rlhf_ray.cluster.roles")


def connect(cfg: ExperimentConfig) -> None:
    """Join the cluster named by ``ray.address`` or RAY_ADDRESS (``ray job submit`` sets it); otherwise
    start a local Ray of this run's own — never another run's cluster that happens to be on the machine
    (it would die with that run). A process already connected to Ray (a notebook, a test session) keeps that
    connection, and keeps it after the run: stop_ray() only undoes what connect() did."""
    if ray.is_initialized():
        return
    _LOCAL_RAY["connected"] = True
    # quiet: the actors write their output to <output_dir>/logs/ and Ray's own records go through the
    # driver's logging (rlhf_ray.run.console), not straight to the terminal
    quiet = {"log_to_driver": False, "configure_logging": False} if cfg.logging.console == "quiet" else {}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        log.info("joined the Ray cluster at %s", address)
    else:
        if cfg.ray.loopback_only:
            _loopback_only()
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **quiet)
        reaper.start_beside(os.getpid())  # this run's Ray processes go with it, even after a SIGKILL
        _LOCAL_RAY["started"] = True
    if quiet:
        _errors_to_log()
    STOP_SIGNALS.install()


def _loopback_only() -> None:
    """Ray binds every server of a node (GCS, raylet, workers, agents, metrics) to the node's address; a node
    with multi-node clustering disabled takes 127.0.0.1 as its address. The variable reaches the processes
    Ray starts; the constant is what the driver's own ray module read when it was imported."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _errors_to_log() -> None:
    """Ray prints the raylet's error messages (e.g. "A worker died…" when an actor is lost) straight to the
    driver's stdout even with log_to_driver=False; in quiet mode they go to driver.log — the run reports a
    lost actor itself, in one line, with what it did about it."""
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "print_to_stdstream"):
        records = logging.getLogger("ray.raylet_errors")
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: [
            records.info("%s", line) for line in data.get("lines", [])]


_LOCAL_RAY = {"started": False, "abandoned": False, "connected": False}


def own_local_ray() -> bool:
    """This run started the Ray it is connected to (it never grows, and it goes with the run)."""
    return _LOCAL_RAY["started"]


def local_ray_down() -> bool:
    """True when this run started its own Ray and its GCS or raylet is gone — e.g. a scheduler signalled the
    whole process group. Every Ray call would then wait 60 s for the GCS and abort the process."""
    if not _LOCAL_RAY["started"]:
        return False
    import psutil

    alive = {p.name() for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
    return not {"gcs_server", "raylet"} <= alive


def stop_ray() -> None:
    """Disconnect from the Ray that connect() joined or started; a local Ray this run started (GCS, raylet, agents,
    workers) stops with it. If that Ray is already down nothing is waited for: rlhf_ray.cluster.reaper stops what
    is left, and the process leaves with os._exit (Ray's exit hooks would wait for the GCS). A connection the
    process had before the run is left as it was."""
    if local_ray_down():
        abandon_ray()
        return
    if _LOCAL_RAY["connected"] and ray.is_initialized():
        ray.shutdown()
    _LOCAL_RAY.update(connected=False, started=False)


def abandon_ray() -> None:
    """Leave Ray as it is: the process must end with os._exit (rlhf_ray.train does)."""
    _LOCAL_RAY["abandoned"] = True


def ray_abandoned() -> bool:
    return _LOCAL_RAY["abandoned"]
