"""One experiment, five reward backends, swapped by config alone: each run's scores come from its own RM.

The same tiny PPO run (configs/tiny_cpu.yaml, 2 steps) with a composite behind the score cache — two routed functions
and an LLM judge (tiny:policy in the reward actor's vLLM engine), each scoring the prompts of one task — and, side by
side, an HTTP endpoint on loopback; and with the RM in the reward actor, then an RM deployed once on Ray Serve
(another RM: tiny:reward of seed 1) and shared by two experiments running at once, which stay on that version while a
second one (seed 2) is deployed beside it — deployed, listed and removed with ``python -m rlhf_ray.rm`` as a user
types it. (The function backend's scores are checked sample by sample in tests/test_e2e_ppo.py.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rlhf_ray.rewards import char_frequency
from rlhf_ray.rewards.base import RewardSample
from rlhf_ray.rewards.http import serve_function
from tests.conftest import ROOT, free_port, metric_rows, ray_head, short_tmp, start_run, tiny_config

pytestmark = pytest.mark.e2e
# 2 steps of 16 prompts, every sample recorded; the critic starts from the same RM in every run, so that
# only the reward backend differs between them
COMMON = ("ppo.total_episodes=32", "checkpoint.every_steps=0", "logging.samples_per_step=16",
          "models.value_model=tiny:reward")
APP = "swap-rm"


def distinctive(prompt: str, response: str) -> float:
    return len(response) % 7 + 100


def run_to_end(out: Path, ray_tmp: str, tiny_cache: Path, *overrides: str) -> list[dict]:
    """The tiny experiment with ``overrides``, to its end; its samples (all 32)."""
    return finish(start_run(out, ray_tmp, tiny_cache, *COMMON, *overrides), out)


def finish(run: subprocess.Popen, out: Path) -> list[dict]:
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-4000:]
    run.console = output
    assert [m["step"] for m in metric_rows(out)] == [1, 2]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    return rows


# a composite of two functions and an LLM judge, each scoring the prompts of one task (the data's `task` column),
# behind the cache. The judge: the tiny policy, pointwise, with a short template, ratings 0–9 (single tokens of the
# tiny tokenizer) read from any digit, the expected rating from vLLM's top-k logprobs; a random model writes a digit in
# some verdicts only, so verdicts that fail to parse (scored -1) are exercised too. Weight 1 and no normalisation: a
# judged sample's score is the judge's raw score.
JUDGE = {"name": "judge", "kind": "judge", "model": "tiny:policy", "route": {"field": "task", "equals": "judge"},
         "judge": {"template": "{{ question }} Answer: {{ response }} Rating 0-9:", "parse": r"(\d)", "rating_min": 0,
                   "rating_max": 9, "unparsed_score": -1, "max_tokens": 8, "temperature": 1, "score": "expected"}}
COMPONENTS = [{"name": "es", "kind": "function", "function": "rlhf_ray.rewards:char_frequency",
               "route": {"field": "task", "equals": "count"}},
              {"name": "concise", "kind": "function", "function": "rlhf_ray.rewards:concise_answer", "weight": 0.5,
               "function_kwargs": {"max_words": 3}, "route": {"field": "task", "equals": "chat"}}, JUDGE]
TASKS = ("count", "chat", "judge")


def tasks_data(tmp_path: Path) -> Path:
    """The tiny prompts with a `task` column: count e's, chat and judge in turn."""
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "tiny_prompts.jsonl").read_text().splitlines()]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({**row, "task": TASKS[i % len(TASKS)]}) + "\n" for i, row in enumerate(rows)))
    return path


def composite_overrides(data: Path, cache: Path) -> tuple[str, ...]:
    return (f"data.prompts={data}", "models.reward.kind=composite", f"models.reward.components={json.dumps(COMPONENTS)}",
            "models.reward.cache=disk", f"models.reward.cache_path={cache}")


def check_composite_run(out: Path, rows: list[dict], data: Path, cache: Path, tiny_cache: Path,
                        tiny_tokenizer) -> None:
    """Each sample scored by its task's component, the per-component and cache metrics of each step, and the cache
    shared with another process: the same function components here find every raw score the run stored, identical,
    and the judge's raw scores are in the file under its identity (rlhf_ray.rewards.judge.judge_identity, computed
    here without starting its engine), equal to its samples' scores."""
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.data.sources import load_prompts
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.rewards import concise_answer
    from rlhf_ray.rewards.backends import build_backend
    from rlhf_ray.rewards.cache import DiskStore, cache_key
    from rlhf_ray.rewards.judge import judge_identity

    cfg = tiny_config(out, tiny_cache, f"data.prompts={data}")
    prompts = {p.text: p for p in load_prompts(cfg.data, tiny_tokenizer, ["task"]).prompts}
    task = {row["prompt"]: prompts[row["prompt"]].fields["task"] for row in rows}
    judged = [row for row in rows if task[row["prompt"]] == "judge"]
    for row in rows:
        if task[row["prompt"]] == "judge":
            assert row["score"] == -1 or 0 <= row["score"] <= 9
            continue
        count = task[row["prompt"]] == "count"
        expected = char_frequency("", row["response"]) if count else 0.5 * concise_answer("", row["response"], 3)
        assert row["score"] == pytest.approx(expected, abs=1e-6)
    for step in metric_rows(out):
        assert step["reward/es/count"] + step["reward/concise/count"] + step["reward/judge/count"] == 16
        assert step["reward/es/count"] > 0 and step["reward/judge/count"] > 0
        assert step["reward/cache_hits"] + step["reward/cache_misses"] == 16 and "reward/concise/raw_mean" in step
    assert_judged(judged, metric_rows(out))
    functions = COMPONENTS[:2]
    composite = build_backend(RewardConfig(kind="composite", components=functions, cache="disk", cache_path=str(cache)))
    samples = [RewardSample.of(prompts[r["prompt"]].messages, r["prompt"], r["response"],
                               fields=prompts[r["prompt"]].fields) for r in rows if r not in judged]
    assert composite.score(samples).tolist() == [r["score"] for r in rows if r not in judged]  # float32 → JSON: exact
    assert composite.take_stats().metrics()["reward/cache_hit_rate"] == 1.0
    judge = RewardConfig(**{k: v for k, v in JUDGE.items() if k not in ("name", "route")})
    identity = judge_identity(judge, resolve_model(judge.model, cfg.models.cache_dir, cfg.seed), cfg.models.dtype)
    keys = [cache_key(identity, RewardSample.of(prompts[r["prompt"]].messages, r["prompt"], r["response"]))
            for r in judged]
    stored = DiskStore(str(cache)).get_many(keys)
    assert [stored.get(k) for k in keys] == [r["score"] for r in judged]


def assert_judged(rows: list[dict], metrics: list[dict]) -> None:
    """Each verdict scored: an expected rating in [0, 9], or -1 where it did not parse — and each step's
    reward/judge/judge_unparsed is the share of those among the samples the judge scored in it: the step's judged
    samples the cache did not hold yet (a sample seen in an earlier step, or twice in the step, is a hit); both kinds
    occur."""
    seen = set()
    for m in metrics:
        fresh = {}
        for row in rows:
            key = (row["prompt"], row["response"])
            if row["step"] == m["step"] and key not in seen:
                fresh.setdefault(key, row["score"] == -1)
        seen |= set(fresh)
        if not fresh:
            assert "reward/judge/judge_unparsed" not in m
            continue
        assert m["reward/judge/judge_unparsed"] == pytest.approx(sum(fresh.values()) / len(fresh))
        assert m["reward/judge/judge_overlong"] == 0 and 0 <= m["reward/judge/judge_expected_fallback"] <= 1
    assert 0 < sum(row["score"] == -1 for row in rows) < len(rows), [row["score"] for row in rows]


def test_composite_and_http_endpoint_side_by_side(tiny_cache, tiny_tokenizer, tmp_path):
    """The two runs go side by side, each in a local Ray of its own (they used to go one after the other)."""
    data, cache = tasks_data(tmp_path), tmp_path / "scores.sqlite"
    with short_tmp("rw") as function_tmp, short_tmp("rx") as http_tmp, serve_function(distinctive) as server:
        runs = [start_run(tmp_path / "function", function_tmp, tiny_cache, *COMMON,
                          *composite_overrides(data, cache)),
                start_run(tmp_path / "http", http_tmp, tiny_cache, *COMMON, "models.reward.kind=http",
                          f"models.reward.url={server.url}", "models.reward.batch_size=6")]
        try:
            function_rows = finish(runs[0], tmp_path / "function")
            http_rows = finish(runs[1], tmp_path / "http")
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
        assert server.requests == 2 * 3  # 2 steps × ⌈16 samples / batch_size 6⌉ requests
    check_composite_run(tmp_path / "function", function_rows, data, cache, tiny_cache, tiny_tokenizer)
    for row in http_rows:
        assert row["score"] == distinctive(row["prompt"], row["response"])


# ------------------------------------------------------------------------------------------------ Ray Serve

def rm(env: dict, *args: str, returncode: int = 0) -> str:
    """``python -m rlhf_ray.rm ARGS`` as a user types it; its stdout (its stderr where it is to fail)."""
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.rm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == returncode, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout if returncode == 0 else done.stderr


def rm_commands(env: dict, *commands: list[str]) -> list[SimpleNamespace]:
    """Several ``rlhf_ray.rm`` commands, run by one process one after another (tests/rm_commands.py: the CLI's main()
    with each one's arguments), each one's exit code, stdout and stderr."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "rm_commands.py"), json.dumps(commands)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return [SimpleNamespace(**result) for result in json.loads(lines[-1].removeprefix("RESULTS"))]


def route_of(deployed: str) -> str:
    return deployed.split(" route ")[1].split(";")[0]


def as_samples(rows: list[dict], messages_of: dict[str, list[dict]]):
    return [RewardSample.of(messages_of[r["prompt"]], r["prompt"], r["response"]) for r in rows]


def direct_scores(rm_path: str, samples) -> list[float]:
    """What the RM at ``rm_path`` gives ``samples``, scored here by the model backend."""
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.rewards.model import ModelBackend

    backend = ModelBackend(RewardConfig(kind="model", model=rm_path, max_length=256, batch_size=16), model_path=rm_path)
    return backend.score(samples).tolist()


def http_scores(route: str, probe) -> list[float]:
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.rewards.backends import build_backend

    return build_backend(RewardConfig(kind="http", url=route)).score(probe).tolist()


def serve_command(address: str, tiny_cache: Path, seed: int) -> list[str]:
    """``rm serve``: the next version of APP, tiny:reward of ``seed``."""
    return ["serve", APP, "--model", "tiny:reward", "--cache-dir", str(tiny_cache), "--seed", str(seed),
            "--max-length", "256", "--num-cpus", "0.25", "--max-batch-size", "8", "--http-port", str(free_port()),
            "--address", address]


def wait_until_pinned(outs: list[Path], runs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until every run has resolved its RM version (its config.yaml is written once its roles are up)."""
    import time

    deadline = time.time() + timeout_s
    while not all((out / "config.yaml").is_file() for out in outs):
        assert time.time() < deadline and all(run.poll() is None for run in runs), "a run ended before it started"
        time.sleep(0.5)


def serve_experiments(tmp_path: Path, tiny_cache: Path, address: str, env: dict, routes: list, probe: list,
                      monkeypatch) -> SimpleNamespace:
    """Two experiments against version v1 at once, one pinned (APP@v1), one by the bare name (latest, then v1);
    once both have pinned, v2 (another RM) is deployed beside them. v1's identity before and after, ``probe`` scored
    through v1's HTTP route before v2 and through each version's after, the version list, and ``rm remove``."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the runs join a head that uses token auth
    seen = SimpleNamespace()
    seen.v1_before = http_scores(routes[0], probe)
    outs = [tmp_path / f"serve-{i}" for i in range(2)]
    with short_tmp("rs") as first_tmp, short_tmp("rt") as second_tmp:
        runs = [start_run(out, ray_tmp, tiny_cache, *COMMON, "models.reward.kind=serve", f"models.reward.app={app}",
                          f"ray.address={address}")
                for out, ray_tmp, app in zip(outs, (first_tmp, second_tmp), (f"{APP}@v1", APP))]
        try:
            wait_until_pinned(outs, runs)
            # v2, the new latest, while they run: `python -m rlhf_ray.rm serve` as a user types it
            routes.append(route_of(rm(env, *serve_command(address, tiny_cache, seed=2))))
            seen.rows = [finish(run, out) for run, out in zip(runs, outs)]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
    seen.consoles = [run.console for run in runs]
    seen.pinned = [yaml.safe_load((out / "config.yaml").read_text())["models"]["reward"]["app"] for out in outs]
    seen.v1_after, seen.v2 = http_scores(routes[0], probe), http_scores(routes[1], probe)
    at = ["--address", address]
    info, listing, refused, *removed, after = rm_commands(
        env, ["info", f"{APP}@v1", *at], ["list", "--json", *at], ["remove", f"{APP}@v1", *at],  # it just scored
        *(["remove", f"{APP}@{v}", "--force", *at] for v in ("v1", "v2")), ["list", *at])
    assert [c.code for c in (info, listing, refused, *removed, after)] == [0, 0, 1, 0, 0, 0], refused
    seen.identities = [json.loads(info.stdout)]
    seen.listing, seen.refused = json.loads(listing.stdout), refused.stderr
    seen.removed, seen.after = [r.stdout for r in removed], after.stdout
    return seen


def test_model_and_a_shared_serve_rm_across_two_experiments_and_two_versions(tiny_cache, tiny_tokenizer, tmp_path,
                                                                             monkeypatch):
    from rlhf_ray.data.sources import load_prompts
    from rlhf_ray.models.specs import resolve_model

    config_rm = resolve_model("tiny:reward", tiny_cache)           # the config's RM (models.reward.model)
    served_rm = resolve_model("tiny:reward", tiny_cache, seed=1)   # the Serve app's v1: another RM
    v2_rm = resolve_model("tiny:reward", tiny_cache, seed=2)       # its v2: a third
    messages_of = {p.text: p.messages for p in load_prompts(tiny_config(tmp_path, tiny_cache).data,
                                                            tiny_tokenizer).prompts}
    probe = [RewardSample.of(messages, text, response) for (text, messages), response
             in zip(list(messages_of.items())[:3], ("Blue.", "The sea is wide.", ""))]
    with short_tmp("rm") as model_tmp, short_tmp("rh") as head_tmp:
        # the config as it is (kind=model), in a local Ray of its own, while the head starts and the app deploys
        model_run = start_run(tmp_path / "model", model_tmp, tiny_cache, *COMMON)
        try:
            # two runs' roles (2 × 1.5) + a replica of each version (2 × 0.25)
            with ray_head(head_tmp, num_cpus=4) as (address, _, env):
                deployed, info = rm_commands(env, serve_command(address, tiny_cache, seed=1),
                                             ["info", APP, "--address", address])
                assert deployed.code == info.code == 0, (deployed, info)
                routes = [route_of(deployed.stdout)]
                seen = serve_experiments(tmp_path, tiny_cache, address, env, routes, probe, monkeypatch)
                seen.identities.insert(0, json.loads(info.stdout))
                model_rows = finish(model_run, tmp_path / "model")  # it went on beside them
        finally:
            if model_run.poll() is None:
                model_run.kill()
    # one app, one process, served both experiments: each run's 2 steps (16 samples each)
    identities = seen.identities
    assert identities[0]["model_path"] == served_rm and identities[0]["requests"] == 0
    assert [(info["app"], info["version"], info["serve_app"]) for info in identities] == [(APP, "v1", f"{APP}@v1")] * 2
    assert len({info["pid"] for info in identities}) == 1  # v2's deployment left v1's replica alone
    assert [info["requests"] for info in identities] == [0, 6]  # the probe, 2 runs × 2 steps, the probe again
    assert [info["samples"] for info in identities] == [0, 3 + 64 + 3]
    # both runs stayed on v1 — the one that named the bare APP resolved it once, when it started — and say so
    assert seen.pinned == [f"{APP}@v1"] * 2
    assert f"reward: Serve RM '{APP}@v1' (pinned)" in seen.consoles[0]
    assert f"reward: Serve RM '{APP}@v1' (resolved from {APP})" in seen.consoles[1]
    # v2 changed nothing of v1's scores; it is another RM; and the latest now
    assert seen.v1_before == seen.v1_after == pytest.approx(direct_scores(served_rm, probe), abs=1e-5)
    assert seen.v2 == pytest.approx(direct_scores(v2_rm, probe), abs=1e-5)
    assert max(abs(a - b) for a, b in zip(seen.v1_after, seen.v2)) > 1e-3
    versions = {row["version"]: row for row in seen.listing if row["name"] == APP}
    assert {v: (row["status"], row["replicas"], row["reserved"], row["latest"], row["path"])
            for v, row in versions.items()} == {"v1": ("RUNNING", "1/1", "1 × 0.25 CPU", "-", served_rm),
                                                "v2": ("RUNNING", "1/1", "1 × 0.25 CPU", "latest", v2_rm)}
    assert f"{APP}@v1 answered a score call" in seen.refused
    assert seen.removed[0].startswith(f"{APP}@v1: removed; {APP}@latest is now {APP}@v2")
    assert APP not in seen.after
    # each version's HTTP route (v1 schema) is on loopback only and its own
    assert [route.rsplit("/", 2)[1:] for route in routes] == [[APP, "v1"], [APP, "v2"]]
    assert all(route.startswith("http://127.0.0.1:") for route in routes)

    model_scores = [r["score"] for r in model_rows]
    assert model_scores == pytest.approx(direct_scores(config_rm, as_samples(model_rows, messages_of)), abs=1e-5)
    for rows in seen.rows:
        scores, samples = [r["score"] for r in rows], as_samples(rows, messages_of)
        assert scores == pytest.approx(direct_scores(served_rm, samples), abs=1e-5)
        assert max(abs(a - b) for a, b in zip(scores, direct_scores(config_rm, samples))) > 1e-3
