"""Versions of a shared Serve RM without a cluster: the NAME@VERSION grammar, latest and the next version from the
application names, what a run pins and keeps on resume, the CLI's redeploy and removal rules, ``rm list``'s table
from a fake ``serve.status()``, and the model fingerprint. (Deployed for real in tests/test_reward_swap.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_ray.cli import rm as cli
from rlhf_ray.config import ConfigError, RewardConfig, build_config
from rlhf_ray.config.reward import parse_app
from rlhf_ray.rewards import serve as serve_rm
from rlhf_ray.rewards.versions import (is_pinned, latest_app, model_fingerprint, next_version, resolve_app,
                                       route_prefix, serve_app_name, versions_of)

APPS = ["helpful@v1", "helpful@v2", "helpful@v10", "helpful-big@v3", "other-app", "legacy"]


@pytest.mark.parametrize("value, parsed", [("helpful", ("helpful", "latest")), ("helpful@latest", ("helpful", "latest")),
                                           ("helpful@v2", ("helpful", "v2")), ("rm.v-2_x@v10", ("rm.v-2_x", "v10"))])
def test_app_names_and_versions_parse(value, parsed):
    assert parse_app(value) == parsed
    assert is_pinned(value) == (parsed[1] != "latest")


@pytest.mark.parametrize("value", ["helpful@2", "helpful@v0", "helpful@v02", "helpful@", "@v1", "a/b@v1",
                                   "helpful@v1@v2", "helpful@newest", "-x"])
def test_a_malformed_app_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"models\.reward\.app: .* is not NAME, NAME@latest or NAME@vN"):
        build_config({"models": {"reward": {"kind": "serve", "app": value}}})
    assert build_config({"kind": "serve", "app": "helpful@v3"}, RewardConfig).app == "helpful@v3"


def test_versions_latest_and_the_next_one_come_from_the_application_names():
    assert versions_of("helpful", APPS) == [1, 2, 10]  # numbers, not strings: v10 is above v2
    assert latest_app("helpful", APPS) == "helpful@v10"
    assert next_version("helpful", APPS) == "v11" and next_version("new", APPS) == "v1"
    assert latest_app("legacy", APPS) == "legacy"  # deployed before versions: a bare name still finds it
    assert latest_app("helpful-big", APPS) == "helpful-big@v3" and latest_app("nothing", APPS) is None
    assert (serve_app_name("helpful", "v2"), route_prefix("helpful", "v2")) == ("helpful@v2", "/helpful/v2")


def test_a_spec_resolves_to_one_application_or_says_what_is_deployed():
    assert resolve_app("helpful", APPS) == resolve_app("helpful@latest", APPS) == "helpful@v10"
    assert resolve_app("helpful@v2", APPS) == "helpful@v2"
    assert resolve_app("legacy", APPS) == "legacy"
    with pytest.raises(ValueError, match=r"models.reward.app='helpful@v3': no such Ray Serve RM on this cluster "
                                         r"\(helpful has v1, v2, v10\); deploy it with `python -m rlhf_ray.rm serve "
                                         r"helpful --model …`"):
        resolve_app("helpful@v3", APPS)
    with pytest.raises(ValueError, match=r"no version of 'nothing' is deployed"):
        resolve_app("nothing@latest", APPS)


# ------------------------------------------------------------------------------------------------ a run's version

class FakeHandle:
    def __init__(self, info):
        self.info = SimpleNamespace(remote=lambda: SimpleNamespace(result=lambda timeout_s: info))


def test_a_run_pins_latest_once_and_a_resume_keeps_the_recorded_version(monkeypatch, caplog):
    apps = ["helpful@v1", "helpful@v2"]
    monkeypatch.setattr(serve_rm, "deployed_apps", lambda: list(apps))
    monkeypatch.setattr(serve_rm, "app_handle", lambda app: FakeHandle(
        {"app": "helpful", "version": app.split("@")[1], "serve_app": app, "model": "tiny:reward",
         "model_path": f"/rms/{app}", "fingerprint": f"f-{app}"}))
    reward = build_config({"kind": "serve", "app": "helpful@latest"}, RewardConfig)
    caplog.set_level("INFO", logger="rlhf_ray.rewards.serve")
    identity = serve_rm.pin_reward_app(reward)
    assert reward.app == "helpful@v2" and identity["version"] == "v2"
    assert "reward: Serve RM 'helpful@v2' (resolved from helpful@latest), model tiny:reward" in caplog.text
    saved = {"models": {"reward": {"kind": "serve", "app": reward.app}}}  # its config.yaml
    apps.append("helpful@v3")  # a newer version, deployed while the run was stopped

    resumed = build_config({"kind": "serve", "app": "helpful"}, RewardConfig)  # the same command, resume=auto
    assert serve_rm.adopt_pinned_app(resumed, saved)
    assert serve_rm.pin_reward_app(resumed, "ckpt/step-2")["version"] == "v2"
    assert "reward: Serve RM 'helpful@v2' (recorded in ckpt/step-2)" in caplog.text
    fresh = build_config({"kind": "serve", "app": "helpful"}, RewardConfig)  # a new run gets the new latest
    assert serve_rm.pin_reward_app(fresh)["version"] == "v3"
    for named, adopted in (("helpful@v3", False), ("other", False)):  # a version named, another RM: left as given
        cfg = build_config({"kind": "serve", "app": named}, RewardConfig)
        assert serve_rm.adopt_pinned_app(cfg, saved) is adopted and cfg.app == named


def test_a_resume_refuses_a_version_that_now_serves_another_model():
    recorded = serve_rm.recorded_identity({"app": "helpful", "version": "v2", "serve_app": "helpful@v2",
                                           "model_path": "/rms/a", "fingerprint": "aaaa", "pid": 7})
    assert set(recorded) == {"app", "version", "serve_app", "model_path", "fingerprint"}
    serve_rm.check_same_model({**recorded, "model_path": "/copy/of/a"}, recorded, "ckpt")  # same content: fine
    serve_rm.check_same_model(recorded, None, "ckpt")  # a checkpoint from before versions: nothing to compare
    with pytest.raises(ValueError, match=r"cannot resume from ckpt: the Serve RM 'helpful@v2' now serves another "
                                         r"model \(/rms/b, fingerprint bbbb\) than the run scored with \(/rms/a, "
                                         r"fingerprint aaaa\); serve that model as helpful@v2 again"):
        serve_rm.check_same_model({**recorded, "model_path": "/rms/b", "fingerprint": "bbbb"}, recorded, "ckpt")


# ------------------------------------------------------------------------------------------------ the CLI's rules

def test_serve_targets_and_redeploys_of_an_existing_version():
    assert cli.split_target("helpful") == ("helpful", None)
    assert cli.split_target("helpful", "v3") == cli.split_target("helpful@v3") == ("helpful", "v3")
    for bad in (("helpful", "3"), ("helpful@v2", "v3"), ("help/ful", None)):
        with pytest.raises(SystemExit, match="^error: "):
            cli.split_target(*bad)
    info = {"fingerprint": "aaaa", "template": "tulu", "max_length": 256, "dtype": "float32", "num_cpus": 0.25}
    same = cli.scoring_identity(info)
    assert cli.check_redeploy("helpful@v2", info, same, replace=False).startswith("updated in place")
    with pytest.raises(SystemExit, match=r"helpful@v2 is deployed with another model or scoring \(fingerprint "
                                         r"'aaaa' -> 'bbbb'\): runs pinned to it would get other scores"):
        cli.check_redeploy("helpful@v2", info, {**same, "fingerprint": "bbbb"}, replace=False)
    assert cli.check_redeploy("helpful@v2", info, {**same, "max_length": 512}, replace=True) == "replaced (--replace)"
    with pytest.raises(SystemExit, match="not an RM app of this project"):
        cli.check_redeploy("helpful@v2", None, same, replace=False)


def test_remove_takes_one_version_and_refuses_one_in_use():
    assert cli.removal_target("helpful@v2", APPS) == "helpful@v2"
    assert cli.removal_target("legacy", APPS) == "legacy" and cli.removal_target("other-app", APPS) == "other-app"
    for text, message in (("helpful", r"'helpful' has versions helpful@v1, helpful@v2, helpful@v10: remove each"),
                          ("helpful@latest", r"name the version to remove"),
                          ("helpful@v3", r"no Serve application 'helpful@v3' on this cluster")):
        with pytest.raises(ValueError, match=message):
            cli.removal_target(text, APPS)
    assert cli.in_use("helpful@v1", {"idle_s": None}, 300) is None  # never called
    assert cli.in_use("helpful@v1", {"idle_s": 900.0}, 300) is None and cli.in_use("x", None, 300) is None
    assert cli.in_use("helpful@v1", {"idle_s": 12.0}, 300).startswith(
        "helpful@v1 answered a score call 12 s ago: a run pinned to it would stop at its next scoring call")


def fake_status(status: str, running: int, starting: int = 0):
    states = {"RUNNING": running, **({"STARTING": starting} if starting else {})}
    return SimpleNamespace(status=SimpleNamespace(value=status),
                           deployments={"RewardModelServer": SimpleNamespace(replica_states=states)})


def test_the_list_shows_each_version_with_replicas_reserved_resources_and_latest():
    applications = {"helpful@v1": fake_status("RUNNING", 1), "helpful@v2": fake_status("DEPLOYING", 1, 1),
                    "other-app": fake_status("RUNNING", 1)}
    infos = {app: {"app": "helpful", "version": app[-2:], "model": "tiny:reward", "model_path": f"/rms/{app}",
                   "fingerprint": "0123456789abcdef", "num_cpus": 0.25, "num_gpus": 1.0 if app.endswith("2") else 0.0,
                   "url": f"http://127.0.0.1:8000/helpful/{app[-2:]}"} for app in ("helpful@v1", "helpful@v2")}
    rows = cli.version_rows(applications, {**infos, "other-app": None})
    assert [(r["app"], r["version"], r["latest"], r["replicas"], r["reserved"]) for r in rows] == [
        ("helpful@v1", "v1", "-", "1/1", "1 × 0.25 CPU"), ("helpful@v2", "v2", "latest", "1/2", "2 × 0.25 CPU + 1 GPU"),
        ("other-app", "-", "-", "1/1", "-")]
    assert rows[0]["fingerprint"] == "0123456789ab" and rows[0]["path"] == "/rms/helpful@v1"
    table = cli.render_table(rows).splitlines()
    assert table[0].split() == ["NAME", "VERSION", "LATEST", "STATUS", "REPLICAS", "RESERVED", "MODEL", "FINGERPRINT",
                                "ROUTE", "PATH"]
    assert table[2].split() == ["helpful", "v2", "latest", "DEPLOYING", "1/2", "2", "×", "0.25", "CPU", "+", "1", "GPU",
                                "tiny:reward", "0123456789ab", "http://127.0.0.1:8000/helpful/v2", "/rms/helpful@v2"]
    assert table[3].split()[:4] == ["other-app", "-", "-", "RUNNING"]


def test_the_fingerprint_follows_the_content_not_the_place(tmp_path):
    def model(directory, weights: bytes):
        directory.mkdir()
        (directory / "config.json").write_text('{"a": 1}')
        (directory / "model.safetensors").write_bytes(weights)
        return str(directory)

    big = bytes(range(256)) * (3 * 4096 + 7)  # over 2 MiB: its two ends are read
    first = model_fingerprint(model(tmp_path / "a", big))
    assert first == model_fingerprint(model(tmp_path / "copy", big)) and len(first) == 64
    changed_end = big[:-1] + b"\x01"
    assert model_fingerprint(model(tmp_path / "b", changed_end)) != first
    small = b"w" * 1000
    assert model_fingerprint(model(tmp_path / "c", small)) != model_fingerprint(model(tmp_path / "d", b"v" + small[1:]))
    assert model_fingerprint("no/such/model") == model_fingerprint("no/such/model")  # by its name alone
