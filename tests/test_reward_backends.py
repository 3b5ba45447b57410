"""Reward backends without Ray: the HTTP schema against servers on 127.0.0.1, score normalisation, config checks."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.rewards.backends import HttpBackend, build_backend
from rlhf_ray.rewards.base import RewardSample, read_reward_stats
from rlhf_ray.rewards.http import SCHEMA, RewardClient, RewardEndpointDown, serve_function
from rlhf_ray.rewards.normalize import ScoreNormalizer
from rlhf_ray.run.preflight import PreflightError, check_experiment
from tests.conftest import ROOT, tiny_config


def distinctive(prompt: str, response: str) -> float:
    return len(response) % 7 + 100


def samples(n: int) -> list[RewardSample]:
    return [RewardSample.of([{"role": "user", "content": f"q{i}"}], f"<|user|>\nq{i}\n<|assistant|>\n", "x" * i)
            for i in range(n)]


def http_backend(url: str, **cfg) -> HttpBackend:
    return build_backend(RewardConfig(kind="http", url=url, **{"retries": 0, "backoff_s": 0.0, "outage_s": 0.0, **cfg}))


class Scripted:
    """A loopback server answering POSTs from a script of (status, body, delay_s) — the last one repeats —
    and recording what it was sent."""

    def __init__(self, *replies):
        self.replies, self.received = list(replies), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append({"body": json.loads(body), "authorization": self.headers.get("Authorization")})
                status, reply, delay = owner.replies[min(len(owner.received), len(owner.replies)) - 1]
                time.sleep(delay)
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(n: int) -> tuple[int, dict, float]:
    return 200, {"schema": SCHEMA, "scores": [float(i) for i in range(n)]}, 0.0


# ----------------------------------------------------------------------------------------------- http

def test_http_scores_come_back_in_order_in_batches_of_batch_size():
    with serve_function(distinctive) as server:
        assert server.url.startswith("http://127.0.0.1:")
        backend = http_backend(server.url, batch_size=3)
        batch = samples(8)
        scores = backend.score(batch)
        assert scores.dtype == torch.float32
        assert scores.tolist() == [distinctive(s.prompt, s.response) for s in batch]
        assert server.requests == 3  # 3 + 3 + 2 samples


def test_http_sends_the_v1_schema_and_a_bearer_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("RM_TOKEN_FOR_TEST", "s3cret")
    with Scripted(ok(2)) as server:
        http_backend(server.url, token_env="RM_TOKEN_FOR_TEST").score(samples(2))
        sent = server.received[0]
        assert sent["authorization"] == "Bearer s3cret"
        assert sent["body"]["schema"] == SCHEMA
        assert sent["body"]["samples"][1] == {"messages": [{"role": "user", "content": "q1"},
                                                           {"role": "assistant", "content": "x"}],
                                              "prompt": "<|user|>\nq1\n<|assistant|>\n", "response": "x"}
    monkeypatch.delenv("RM_TOKEN_FOR_TEST")
    with pytest.raises(ValueError, match="models.reward.token_env='RM_TOKEN_FOR_TEST': that environment variable"):
        http_backend("http://127.0.0.1:9/", token_env="RM_TOKEN_FOR_TEST")


def test_http_retries_503_with_back_off_then_succeeds():
    with Scripted((503, "busy", 0.0), (503, "busy", 0.0), ok(2)) as server:
        start = time.monotonic()
        scores = http_backend(server.url, retries=3, backoff_s=0.2).score(samples(2))
        elapsed = time.monotonic() - start
    assert scores.tolist() == [0.0, 1.0] and len(server.received) == 3
    assert elapsed >= 0.4 - 0.05, elapsed  # urllib3: the first retry at once, the second after 0.2 × 2


def test_http_500_after_retries_names_the_endpoint_status_and_body():
    with Scripted((500, "model exploded " + "x" * 300, 0.0)) as server:
        with pytest.raises(RuntimeError, match=rf"reward endpoint {server.url} answered HTTP 500 \(after up to 2 "
                                               r"retries\): 'model exploded x+'$") as err:
            http_backend(server.url, retries=2).score(samples(1))
    assert len(server.received) == 3 and len(str(err.value)) < 400


def test_http_timeout_is_an_error_naming_the_endpoint():
    with Scripted((200, {"schema": SCHEMA, "scores": [1.0]}, 3.0)) as server:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"reward endpoint {server.url} did not answer within 0.3 s "
                                               r"\(models.reward.timeout_s\)"):
            http_backend(server.url, timeout_s=0.3, retries=2).score(samples(1))
        assert time.monotonic() - start < 2 and len(server.received) == 1  # a slow answer is not retried


def test_http_endpoint_that_is_down():
    with Scripted(ok(1)) as server:
        url = server.url
    with pytest.raises(RuntimeError, match=rf"reward endpoint {url} cannot be reached after 1 retries"):
        http_backend(url, retries=1).score(samples(1))


def test_http_an_outage_shorter_than_outage_s_is_ridden_out(caplog):
    """The endpoint goes away and comes back on the same port: the client keeps trying, says so, and scores."""
    with serve_function(distinctive) as server:
        port, url = server.port, server.url
    backend = http_backend(url, outage_s=20, backoff_s=0.1)
    restarted = []
    timer = threading.Timer(1.5, lambda: restarted.append(serve_function(distinctive, port=port)))
    timer.start()
    try:
        start = time.monotonic()
        assert backend.score(samples(2)).tolist() == [100.0, 101.0]
        assert time.monotonic() - start >= 1.4 and restarted[0].requests == 1
    finally:
        timer.join()
        restarted[0].close()
    assert re.search(rf"reward endpoint {url} unreachable for 0 s \(.*Connection refused.*\); retrying until 20 s "
                     r"\(models.reward.outage_s\)", caplog.text), caplog.text
    assert f"reward endpoint {url} reachable again after" in caplog.text


def test_http_an_outage_longer_than_outage_s_stops_with_the_endpoint_named():
    with Scripted(ok(1)) as server:
        url = server.url
    start = time.monotonic()
    with pytest.raises(RewardEndpointDown, match=rf"^reward endpoint {url} unreachable for 1 s, as long as "
                                                 r"models.reward.outage_s=1 allows; last: cannot be reached after 0 "
                                                 r"retries \(models.reward.retries\): .*Connection refused"):
        http_backend(url, outage_s=1, backoff_s=0.1).score(samples(1))
    assert 1.0 <= time.monotonic() - start < 5


def test_http_5xx_counts_as_an_outage_too():
    with Scripted((503, "overloaded", 0.0), (502, "bad gateway", 0.0), ok(2)) as server:
        assert http_backend(server.url, outage_s=10, backoff_s=0.05).score(samples(2)).tolist() == [0.0, 1.0]
        assert len(server.received) == 3


def test_the_driver_is_told_of_an_outage_when_it_starts_then_once_a_minute(caplog, monkeypatch):
    import logging

    import ray

    from rlhf_ray.rewards.outage import OutageRecord, OutageWatch

    caplog.set_level(logging.INFO, logger="rlhf_ray.rewards.outage")
    records, clock = [], [0.0]
    watch = OutageWatch(lambda: list(records), clock=lambda: clock[0])
    down = {"url": "http://rm/", "seconds": 3.0, "reason": "Connection refused", "limit_s": 300.0}
    told = []
    for now, state in [(0, down), (30, {**down, "seconds": 33.0}), (59, {**down, "seconds": 62.0}),
                       (62, {**down, "seconds": 65.0}), (80, None)]:
        clock[0] = now
        records[:] = [state, {**state, "seconds": 1.0}] if state else []  # two reward actors
        caplog.clear()
        watch.poll()
        told += caplog.messages
    assert told == ["reward endpoint http://rm/ unreachable for 3 s (Connection refused); retrying until 300 s "
                    "(models.reward.outage_s)",
                    "reward endpoint http://rm/ unreachable for 65 s (Connection refused); retrying until 300 s "
                    "(models.reward.outage_s)",
                    "reward endpoint http://rm/ reachable again after about 83 s"]
    caplog.clear()
    for now, outage in [(100, "a#0"), (102, "a#1")]:  # one outage, then the next before the watch saw a gap
        clock[0], records[:] = now, [{**down, "outage": outage}]
        watch.poll()
    assert caplog.messages == [told[0], "reward endpoint http://rm/ reachable again after about 5 s", told[0]]
    caplog.clear()
    records[:] = [{**down, "outage": "a#1", "gave_up": True}]  # the client gave up: the run stops on its error
    clock[0] = 500
    watch.poll()
    assert caplog.messages == []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (the suite's shared Ray session may be up)
    assert OutageRecord().key is None  # without Ray there is no driver to tell


def test_outage_s_must_fit_in_the_scoring_timeout(tmp_path):
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"models.reward.outage_s: 600 s of riding out an outage plus one request "
                                          r"\(models.reward.timeout_s=60\) must fit in timeouts.score_s=600"):
        tiny_config(tmp_path, None, "models.reward.kind=http", "models.reward.url=http://h/",
                    "models.value_init=policy", "models.reward.outage_s=600")


@pytest.mark.parametrize("reply, message", [
    ({"schema": SCHEMA, "scores": [1.0]}, r"answered 1 scores for 2 samples"),
    ('{"schema": "rlhf-ray/reward/v1", "scores": [1.0, NaN]}', r"answered score 1 = nan; scores must be finite"),
    ('{"schema": "rlhf-ray/reward/v1", "scores": [Infinity, 1]}', r"answered score 0 = inf"),
    ({"schema": SCHEMA, "scores": [1.0, "2.0"]}, r"answered score 1 = '2.0' \(str\); scores must be numbers"),
    ({"schema": SCHEMA, "scores": [None, 1.0]}, r"answered score 0 = None \(NoneType\)"),
    ({"schema": SCHEMA, "scores": [True, 1.0]}, r"answered score 0 = True \(bool\)"),
    ({"scores": [1.0, 2.0]}, r"answered schema None, expected 'rlhf-ray/reward/v1'"),
    ({"schema": "rlhf-ray/reward/v0", "scores": [1.0, 2.0]}, r"answered schema 'rlhf-ray/reward/v0'"),
    ({"schema": SCHEMA}, r"answered without a 'scores' list"),
    ("<html>Bad Gateway</html>", r"answered with something that is not JSON: '<html>Bad Gateway</html>'"),
    ([1.0, 2.0], r"answered schema None"),
])
def test_http_bad_answers_are_errors_naming_the_endpoint(reply, message):
    with Scripted((200, reply, 0.0)) as server:
        with pytest.raises(ValueError, match=rf"^reward endpoint {server.url} {message}"):
            http_backend(server.url).score(samples(2))


def test_reference_server_speaks_v1_only_and_answers_health():
    import requests

    with serve_function(distinctive) as server:
        assert requests.get(server.url + "health", timeout=5).status_code == 200
        wrong = requests.post(server.url, json={"schema": "other/v9", "samples": []}, timeout=5)
        assert wrong.status_code == 400 and "send 'rlhf-ray/reward/v1'" in wrong.json()["error"]
        malformed = requests.post(server.url, timeout=5, json={"schema": "rlhf-ray/reward/v1", "samples": [
            {"messages": "hi", "prompt": "p", "response": "r"}]})
        assert malformed.status_code == 400 and "sample 0: 'messages' must be" in malformed.json()["error"]
        assert RewardClient(server.url).score([s.to_json() for s in samples(2)]) == [100.0, 101.0]
    with serve_function(lambda p, r: 1 / 0) as failing:
        with pytest.raises(RuntimeError, match=r"answered HTTP 500 .*ZeroDivisionError"):
            RewardClient(failing.url, retries=0).score([s.to_json() for s in samples(1)])


@pytest.mark.e2e
def test_reference_server_command_line():
    server = subprocess.Popen([sys.executable, "-m", "rlhf_ray.rewards.http", "--function",
                               "rlhf_ray.rewards:char_frequency", "--kwargs", '{"char": "x"}', "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        # the version the endpoint declares (GET /info; the score cache keys on it): by default a hash of the function
        assert re.match(r"scoring rlhf_ray.rewards:char_frequency \(version [0-9a-f]{16}\) at http://127.0.0.1:", line), line
        url = line.split(" at ")[1].split()[0]
        assert RewardClient(url).score([s.to_json() for s in samples(3)]) == [0.0, 1.0, 1.0]
    finally:
        server.terminate()
        server.wait(timeout=30)


# ----------------------------------------------------------------------------------------------- normalisation

def test_stored_normalisation_and_clip():
    stats = {"mean": 2.0, "std": 4.0, "count": 10, "source": "test"}
    norm = ScoreNormalizer("stored", stored=stats, clip=0.5)
    torch.testing.assert_close(norm(torch.tensor([2.0, 6.0, -10.0, 3.0])), torch.tensor([0.0, 0.5, -0.5, 0.25]))
    assert ScoreNormalizer("none")(torch.tensor([7.0])).item() == 7.0
    assert ScoreNormalizer("none", clip=1.0)(torch.tensor([7.0, -0.5])).tolist() == [1.0, -0.5]
    with pytest.raises(ValueError, match="normalize='stored' needs the RM's stored statistics"):
        ScoreNormalizer("stored")
    with pytest.raises(ValueError, match=r"std.*got"):
        ScoreNormalizer("stored", stored={"mean": 0.0, "std": 0.0, "count": 1, "source": ""})


def test_running_normalisation_uses_every_score_so_far_this_batch_included():
    torch.manual_seed(0)
    batches = [torch.randn(n) * 3 + 5 for n in (4, 7, 1, 16)]
    norm = ScoreNormalizer("running")
    for i, batch in enumerate(batches):
        seen = torch.cat(batches[:i + 1]).double()
        expected = (batch.double() - seen.mean()) / seen.std(unbiased=False)
        torch.testing.assert_close(norm(batch), expected.float())
    assert norm.count == 28
    same = ScoreNormalizer("running")
    assert same(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]  # no spread yet: 0, not nan


def test_running_state_survives_a_checkpoint_as_json():
    torch.manual_seed(1)
    batches = [torch.randn(8) for _ in range(4)]
    straight = ScoreNormalizer("running", clip=1.5)
    expected = [straight(b) for b in batches]
    first = ScoreNormalizer("running", clip=1.5)
    [first(b) for b in batches[:2]]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ScoreNormalizer("running", clip=1.5)
    resumed.load_state_dict(state)
    for batch, want in zip(batches[2:], expected[2:]):
        assert torch.equal(resumed(batch), want)
    assert resumed.state_dict() == straight.state_dict()


def test_reward_stats_file_is_checked(tmp_path):
    assert read_reward_stats(str(tmp_path)) is None
    (tmp_path / "reward_stats.json").write_text('{"mean": 1.0, "std": -1, "count": 3, "source": "x"}')
    with pytest.raises(ValueError, match=r"reward_stats.json must hold"):
        read_reward_stats(str(tmp_path))
    (tmp_path / "reward_stats.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        read_reward_stats(str(tmp_path))
    (tmp_path / "reward_stats.json").write_text('{"mean": 1, "std": 2.5, "count": 3, "source": "rm eval"}')
    assert read_reward_stats(str(tmp_path)) == {"mean": 1.0, "std": 2.5, "count": 3, "source": "rm eval"}
    assert math.isfinite(read_reward_stats(str(tmp_path))["mean"])


# ----------------------------------------------------------------------------------------------- config and preflight

@pytest.mark.parametrize("overrides, key, message", [
    (["models.reward.kind=http"], "models.reward.url", "must be an http:// or https:// URL"),
    (["models.reward.kind=http", "models.reward.url=127.0.0.1:8001"], "models.reward.url", "http:// or https://"),
    (["models.reward.kind=serve"], "models.reward.app", "is required when models.reward.kind='serve'"),
    (["models.reward.kind=http", "models.reward.url=http://h/", "models.value_init=policy",
      "models.reward.normalize=stored"], "models.reward.normalize", "'stored' needs an RM with saved statistics"),
    (["models.reward.kind=http", "models.reward.url=http://h/"], "models.value_init",
     "use 'policy' with a http reward"),
    (["models.reward.normalize=mean"], "models.reward.normalize", "'none', 'stored' or 'running'"),
    (["models.reward.clip=0"], "models.reward.clip", "greater than 0"),
])
def test_reward_config_errors_name_the_key(tmp_path, overrides, key, message):
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match=rf"{key}: .*{message}"):
        tiny_config(tmp_path, None, *overrides)


def test_every_backend_config_validates(tmp_path):
    for overrides in (["models.reward.kind=http", "models.reward.url=https://rm.example/score",
                       "models.value_init=policy"],
                      ["models.reward.kind=serve", "models.reward.app=rm", "models.value_model=tiny:reward",
                       "models.reward.normalize=stored", "models.reward.clip=5"],
                      ["models.reward.normalize=running"]):
        tiny_config(tmp_path, None, *overrides)


def test_serve_needs_a_cluster_address_before_anything_starts(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, None, "models.reward.kind=serve", "models.reward.app=shared-rm",
                      "models.value_init=policy")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PreflightError, match=r"^models.reward.kind='serve' needs the Ray cluster where the app "
                                             r"'shared-rm' runs: set ray.address \(e.g. ray.address=auto\) or "
                                             r"RAY_ADDRESS$"):
        check_experiment(cfg, {})
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_experiment(cfg, {})


def test_http_token_variable_and_stored_statistics_are_checked_up_front(tmp_path, tiny_cache, monkeypatch):
    from rlhf_ray.models.specs import resolve_model

    cfg = tiny_config(tmp_path, None, "models.reward.kind=http", "models.reward.url=http://127.0.0.1:1/",
                      "models.reward.token_env=NO_SUCH_RM_TOKEN", "models.value_init=policy")
    monkeypatch.delenv("NO_SUCH_RM_TOKEN", raising=False)
    with pytest.raises(PreflightError, match="models.reward.token_env='NO_SUCH_RM_TOKEN': that environment variable"):
        check_experiment(cfg, {})
    rm = resolve_model("tiny:reward", tiny_cache)
    cfg = tiny_config(tmp_path, tiny_cache, "models.reward.normalize=stored")
    with pytest.raises(PreflightError, match=r"normalize='stored' needs .*reward/reward_stats.json, and the reward "
                                             r"model tiny:reward has none"):
        check_experiment(cfg, {"models.reward.model": rm})


def test_a_serve_run_without_a_cluster_stops_before_anything_starts(tmp_path, tiny_cache, capsys, monkeypatch):
    from rlhf_ray.train import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.perf_counter()
    assert main(["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"models.cache_dir={tiny_cache}",
                 f"output_dir={tmp_path / 'run'}", "logging.progress_bar=false", "models.reward.kind=serve",
                 "models.reward.app=shared-rm", "models.value_model=tiny:reward"]) == 1
    output = capsys.readouterr()
    lines = [line for line in (output.out + output.err).splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "needs the Ray cluster where the app 'shared-rm' runs: set ray.address" in lines[0]
    assert time.perf_counter() - started < 30 and not (tmp_path / "run" / "metrics.jsonl").exists()


class FakeApp:
    """What ``serve.get_app_handle`` returns, without Ray: ``method.remote(*args).result(timeout_s=…)``."""

    def __init__(self, info: dict, score=None):
        self.calls = []
        self.info = self._method(lambda: info)
        self.score = self._method(score)

    def _method(self, fn):
        app = self

        class Response:
            def __init__(self, args):
                self.args = args

            def result(self, timeout_s):
                app.calls.append(timeout_s)
                return fn(*self.args)

        return SimpleNamespace(remote=lambda *args: Response(args))


def test_serve_backend_calls_the_app_and_reads_its_statistics(monkeypatch):
    from rlhf_ray.rewards import serve as rm

    stats = {"mean": 1.0, "std": 2.0, "count": 5, "source": "rm training"}
    app = FakeApp({"model_path": "/models/rm", "stored_statistics": None},
                  score=lambda batch: [len(s.response) + 0.5 for s in batch])
    monkeypatch.setattr(rm, "app_handle", lambda name: app)
    monkeypatch.setattr(rm, "deployed_apps", lambda: ["shared-rm@v1", "shared-rm@v2", "other"])
    backend = build_backend(RewardConfig(kind="serve", app="shared-rm", timeout_s=7))
    assert backend.app == "shared-rm@v2"  # the bare name: latest, resolved once
    assert backend.score(samples(3)).tolist() == [0.5, 1.5, 2.5] and app.calls == [7, 7]
    assert build_backend(RewardConfig(kind="serve", app="shared-rm@v1")).app == "shared-rm@v1"
    assert backend.stored_statistics() is None
    with pytest.raises(ValueError, match=r"normalize='stored' needs /models/rm/reward_stats.json, and the Serve RM "
                                         r"app 'shared-rm@v2' has none"):
        build_backend(RewardConfig(kind="serve", app="shared-rm", normalize="stored"))
    monkeypatch.setattr(rm, "app_handle", lambda name: FakeApp({"model_path": "/models/rm", "stored_statistics": stats}))
    assert build_backend(RewardConfig(kind="serve", app="shared-rm", normalize="stored")).stored_statistics() == stats

    def too_slow(batch):
        raise TimeoutError("Timed out")

    monkeypatch.setattr(rm, "app_handle", lambda name: FakeApp({"stored_statistics": None}, score=too_slow))
    with pytest.raises(RuntimeError, match=r"the Serve RM app 'shared-rm@v2' did not answer score\(\) within 7 s "
                                           r"\(models.reward.timeout_s"):
        build_backend(RewardConfig(kind="serve", app="shared-rm", timeout_s=7)).score(samples(1))
