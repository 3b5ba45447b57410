"""Shared fixtures: tiny models built once per run into a temporary cache; the fast tier's guard.

Two tiers (tests/README.md): ``scripts/test.sh --fast`` runs the tests not marked ``e2e`` (``-m "not e2e"``, a few
minutes); ``scripts/test.sh`` runs them all. In a test not marked ``e2e`` the guard (tests/fast_guard.py) makes
``ray.init``, a ``vllm.LLM``, ``deepspeed.initialize``, a subprocess and a multiprocessing start fail loudly, so a
heavy test cannot slip into the fast tier unmarked.
"""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import fast_guard

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


fast_guard.install()


def _guarded_phase(item):
    fast_guard.activate(None if item.get_closest_marker("e2e") else item.nodeid)
    try:
        yield
    finally:
        fast_guard.activate(None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _guarded_phase(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _guarded_phase(item)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    from rlhf_ray.models.tiny import build_tiny_models

    cache = tmp_path_factory.mktemp("tiny_cache")
    build_tiny_models(cache, seed=0)
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cache):
    from transformers import AutoTokenizer

    from rlhf_ray.models.specs import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny:policy", tiny_cache))


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is not present (../shared/data is optional)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray session shared by every end-to-end test of the run. address="local": a new Ray of its own,
    never the cluster a RAY_ADDRESS or a left-over /tmp/ray/ray_current_cluster names (a `ray start` or a
    ray.cluster_utils.Cluster killed before its shutdown leaves that file; ray.init() without an address would join
    that cluster, and refuse num_cpus)."""
    import ray

    # metrics exported every 2 s (Ray's default: 10 s): a test scraping them waits less
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 2000})
    yield ray
    ray.shutdown()


def tiny_config(tmp_path, tiny_cache, *overrides):
    """The embedded tiny CPU config with the test's model cache and output dir, plus overrides."""
    from rlhf_ray.config import load_config

    return load_config(ROOT / "configs" / "tiny_cpu.yaml",
                       [f"models.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "logging.progress_bar=false",
                        *overrides])


def vllm_greedy(model_dir: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids from a vLLM engine, in a subprocess (its CPU engine binds threads)."""
    script = f"""
import json, os
os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={model_dir!r}, enforce_eager=True, dtype="float32", max_model_len=512)
out = llm.generate([TokensPrompt(prompt_token_ids={prompt_ids!r})],
                   SamplingParams(max_tokens={max_tokens}, temperature=0, ignore_eos=True), use_tqdm=False)
print("RESULT" + json.dumps(list(out[0].outputs[0].token_ids)))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[0][len("RESULT"):])


def base_reference_logps(run_dir, pairs: list[int]) -> "torch.Tensor":
    """[len(pairs), 2] summed log-probs of (chosen, rejected) of these training pairs of the DPO run in ``run_dir``,
    by its starting model (``model``) loaded plainly: what its reference must be."""
    from transformers import AutoTokenizer

    from rlhf_ray.config import DPOConfig, load_config
    from rlhf_ray.data.sources import preference_sets
    from rlhf_ray.drivers.dpo import encode_response_pairs
    from rlhf_ray.models.modeling import PolicyAndValue, load_causal_lm

    cfg = load_config(run_dir / "config.yaml", schema=DPOConfig)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    train, _ = preference_sets(cfg.data, cfg.seed)
    encoded = encode_response_pairs(tokenizer, train, cfg.data.template, cfg.data.max_prompt_length, cfg.data.max_length)
    sides = encoded.batch(pairs, tokenizer.pad_token_id).sides()
    return PolicyAndValue(load_causal_lm(cfg.model).eval(), None).logprobs(sides).sum(-1).view(-1, 2)


# ------------------------------------------------------------------------- runs as a user starts them

def start_run(out: Path, ray_tmp: str, tiny_cache: Path, *overrides: str) -> subprocess.Popen:
    """``python -m rlhf_ray.train`` on the tiny default in its own local Ray (temp dir ``ray_tmp``)."""
    import os
    import signal

    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", f"models.cache_dir={tiny_cache}",
                             f"output_dir={out}", "logging.progress_bar=false", "logging.report=false", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # a shell running this suite in the background ignores SIGINT, and children
                            # inherit that; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def metric_rows(out: Path) -> list[dict]:
    """The steps a run has recorded so far: its complete lines (a live run may be halfway through writing one)."""
    path = out / "metrics.jsonl"
    written = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in written[:written.rfind("\n") + 1].splitlines()]


def wait_for_steps(run: subprocess.Popen, out: Path, steps: int, timeout_s: float = 300) -> None:
    """Until the run has recorded ``steps`` steps; fails with the run's output if it ended before."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and run.poll() is None:
        if len(metric_rows(out)) >= steps:
            return
        time.sleep(0.2)
    run.kill()
    raise AssertionError(f"the run did not reach step {steps}: {run.communicate()[0][-3000:]}")


def process_table() -> list[tuple[int, int, str]]:
    ps = subprocess.run(["ps", "-ewwo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [(int(p), int(pp), args) for p, pp, args in ((line.strip().split(None, 2) + ["", ""])[:3] for line in ps)
            if p.isdigit()]


def ray_processes(ray_tmp: str) -> list[str]:
    """Processes of the Ray instance whose temp dir is ``ray_tmp`` (their command lines name it)."""
    return [args for _, _, args in process_table() if ray_tmp in args]


def listening_addresses(pid: int) -> set[str]:
    """Addresses the TCP servers of process ``pid`` and its descendants listen on (Ray, agents, rendezvous)."""
    import psutil

    driver = psutil.Process(pid)
    addresses = set()
    for proc in [driver, *driver.children(recursive=True)]:
        try:
            addresses |= {c.laddr.ip.removeprefix("::ffff:") for c in proc.net_connections(kind="tcp")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert addresses, "no listening socket found: the check would prove nothing"
    return addresses


def actor_pid(ray_tmp: str, actor_class: str) -> int:
    """PID of the (one) live ``actor_class`` worker of the Ray instance whose temp dir is ``ray_tmp``."""
    table = process_table()
    raylets = {pid for pid, _, args in table if ray_tmp in args and "raylet" in args}
    pids = [pid for pid, ppid, args in table if ppid in raylets and args.startswith(f"ray::{actor_class}")]
    assert len(pids) == 1, (actor_class, pids)
    return pids[0]


# ------------------------------------------------------------------------------------- a Ray head of its own

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def short_tmp(prefix: str):
    """A temp dir with a short path: Ray's unix socket paths under it must fit 107 bytes."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def ray_head(ray_tmp: str, num_cpus: int = 2, extra_env: dict | None = None):
    """``ray start --head`` on free ports (the test session's own Ray holds the default ones), as a user starts
    one (``extra_env``: the head's and its jobs' environment beside ours); -> (GCS address, dashboard URL, client
    env). --block ties the head's processes to this Popen:
    terminating it stops this cluster only (`ray stop` would also stop the test session's own Ray)."""
    import os
    import time
    import urllib.error
    import urllib.request

    # a head started after any local ray.init() on this machine uses token auth (~/.ray/auth_token): every client
    # must then send the token
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "ray-client-server-port")]
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             *ports, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--num-cpus={num_cpus}", f"--temp-dir={ray_tmp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(1)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env
    finally:
        head.terminate()  # the head drains for up to 30 s, then stops its processes
        head.wait(timeout=120)
