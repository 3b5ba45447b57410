"""Shared clusters, end to end as a user meets them: two runs started at once into one output dir (exactly one
runs; the other is refused in one line naming it), an HTTP reward endpoint that goes away and comes back (ridden
out, told on the console), one that goes away for good (the run checkpoints its finished steps and a resume
completes), and a disk that fills up (one line; the earlier checkpoints stay valid and a resume completes)."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf_ray.rewards.http import RewardServer
from rlhf_ray.run.output_lock import LOCK_NAME
from tests.conftest import metric_rows, short_tmp, start_run, wait_for_steps

pytestmark = pytest.mark.e2e
HTTP_RUN = ("models.reward.kind=http", "models.value_init=policy", "models.reward.retries=1",
            "models.reward.backoff_s=0.1", "models.reward.outage_s=8", "ppo.total_episodes=128",  # 8 steps
            "checkpoint.every_steps=0", "logging.trackers=[]")
SHORT_OUTAGE_AT, SHORT_OUTAGE_S, GONE_AT = 2, 4.0, 5  # after this many rollouts scored


class Endpoint:
    """A loopback v1 endpoint (one request per rollout here) that goes away on cue: after so many rollouts scored, for
    so many seconds or for good. From the cue on it answers 500 until its socket is closed, so that no retry slips
    through before it is gone."""

    def __init__(self, cues: dict | None = None):
        self.scored, self.away, self.lock = 0, False, threading.Lock()
        self.cues = dict(cues or {})  # rollouts scored -> back after so many seconds, or None: never
        self.server = RewardServer(self.score)
        self.port, self.url = self.server.port, self.server.url

    def score(self, samples: list[dict]) -> list[float]:
        with self.lock:
            if not self.away and self.scored in self.cues:
                self.away = True
                threading.Thread(target=self._go_away, args=(self.cues.pop(self.scored),), daemon=True).start()
            if self.away:
                raise RuntimeError("going away")
            self.scored += 1
        return [len(s["response"]) % 7 / 7 for s in samples]

    def _go_away(self, back_after: float | None) -> None:
        self.server.close()
        if back_after is not None:
            time.sleep(back_after)
            with self.lock:
                self.server, self.away = RewardServer(self.score, port=self.port), False

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def http_run(tiny_cache, tmp_path_factory, full_disk):
    """Two identical runs started at once into one output dir (one a scheduler's rerun: resume=auto); the one that
    runs meets the endpoint's short outage, then its end. -> what the test sees. (The full-disk run goes on beside
    them, in a Ray of its own: ``full_disk`` has started it.)"""
    out = tmp_path_factory.mktemp("shared") / "run"
    endpoint = Endpoint({SHORT_OUTAGE_AT: SHORT_OUTAGE_S, GONE_AT: None})
    with short_tmp("sh") as ray_tmp:
        settings = (*HTTP_RUN, f"models.reward.url={endpoint.url}")
        runs = [start_run(out, ray_tmp, tiny_cache, *settings), start_run(out, ray_tmp, tiny_cache, *settings,
                                                                            "resume=auto")]
        try:
            refused = _first_to_end(runs, timeout_s=120)
            refused_output = refused.communicate()[0]
            winner = runs[1 - runs.index(refused)]
            winner_output = winner.communicate(timeout=600)[0]
            first = {"out": out, "winner": winner, "winner_output": winner_output, "refused": refused,
                     "refused_output": refused_output, "rows": metric_rows(out), "checkpoints": _checkpoints(out),
                     "lock_left": (out / LOCK_NAME).exists()}
            endpoint.close()
            again = Endpoint()  # a new endpoint, elsewhere: models.reward.url may change on resume
            resumed = start_run(out, ray_tmp, tiny_cache, *HTTP_RUN, f"models.reward.url={again.url}", "resume=auto")
            first["resumed_output"] = resumed.communicate(timeout=600)[0]
            first["resumed"] = resumed
            again.close()
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
        yield {**first, "endpoint": endpoint, "final_rows": metric_rows(out), "lock_at_end": (out / LOCK_NAME).exists()}


def _first_to_end(runs: list[subprocess.Popen], timeout_s: float) -> subprocess.Popen:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in runs:
            if run.poll() is not None:
                return run
        time.sleep(0.1)
    raise AssertionError("neither run ended: both are running in one output dir")


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_two_runs_started_at_once_into_one_output_dir_exactly_one_runs(http_run):
    refused, lines = http_run["refused"], http_run["refused_output"].strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, http_run["refused_output"][-3000:]
    assert re.fullmatch(rf"error: output_dir='{re.escape(str(http_run['out']))}' is in use by another run: host \S+, pid "
                        rf"{http_run['winner'].pid}, since [\d-]+ [\d:]+, heartbeat \d+ s ago, python -m "
                        rf"rlhf_ray.train .* \(run [0-9a-f]{{12}}\)\. Wait for it to end or choose another output_dir "
                        r"\(the lock of a run that is gone is taken over once its process is gone from this machine "
                        r"or its heartbeat is 120 s old\)", lines[0]), lines[0]
    steps = [row["step"] for row in http_run["rows"]]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, each once: none from the refused one
    assert not http_run["lock_left"]  # released when the run ended (on its error)


def test_an_outage_shorter_than_outage_s_is_ridden_out_and_told_on_the_console(http_run):
    output, url = http_run["winner_output"], http_run["endpoint"].url
    notices = re.findall(rf"reward endpoint {url} unreachable for (\d+) s \(([^)]*)\); retrying until 8 s "
                         r"\(models.reward.outage_s\)", output)
    assert notices, output[-3000:]
    assert re.search(rf"reward endpoint {url} reachable again after about \d+ s", output), output[-3000:]
    assert len(http_run["rows"]) > SHORT_OUTAGE_AT + 1  # steps went on after the outage


def test_an_endpoint_gone_for_good_stops_the_run_with_its_finished_steps_saved_and_resume_completes(http_run):
    winner, output, out = http_run["winner"], http_run["winner_output"], http_run["out"]
    done = len(http_run["rows"])
    assert winner.returncode == 1 and done == GONE_AT, output[-3000:]
    assert re.search(rf"error: reward failed while scoring a rollout: RewardEndpointDown: reward endpoint "
                     rf"{http_run['endpoint'].url} unreachable for \d+ s, as long as models.reward.outage_s=8 allows",
                     output), output[-3000:]
    saved = out / "checkpoints" / f"step-{done:06d}"
    assert output.strip().splitlines()[-1].endswith(
        f"stopped after {done} of 8 steps; checkpoint of step {done} saved to {saved}: rerun with resume=auto to "
        "continue from it"), output[-3000:]
    assert http_run["checkpoints"] == [saved.name]  # checkpoint.every_steps=0: this one is the error's
    resumed = http_run["resumed"]
    assert resumed.returncode == 0, http_run["resumed_output"][-3000:]
    assert f"resumed from {saved}: {done} of 8 steps done" in http_run["resumed_output"]
    assert [row["step"] for row in http_run["final_rows"]] == list(range(1, 9))
    assert not http_run["lock_at_end"]


# ------------------------------------------------------------------------------------------- a full disk

@contextmanager
def small_disk():
    """A 64 MiB tmpfs of the test's own (needs root and mount); None where it cannot be made."""
    with short_tmp("disk") as path:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path], capture_output=True, text=True)
        if made.returncode != 0 or os.geteuid() != 0:
            yield None, made.stderr.strip() or "not root"
            return
        try:
            yield path, ""
        finally:
            subprocess.run(["umount", "-l", path], check=False)


def fill(path: str) -> str:
    """Fill the file system at ``path`` to its last byte; -> the filler file."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    chunk = 1 << 20
    while chunk >= 512:
        try:
            os.write(fd, b"\0" * chunk)
        except OSError:
            chunk //= 2
    os.close(fd)
    return filler


DISK_RUN = ("ppo.total_episodes=128", "checkpoint.every_steps=2")  # 8 steps


def fill_then_resume(disk: str, ray_tmp: str, tiny_cache: Path, seen: dict) -> None:
    """A run into the small disk; the disk fills up after its step 3; once there is room again, a resume. What
    happened goes into ``seen`` (run in a thread, beside the HTTP runs)."""
    out = os.path.join(disk, "run")
    run = start_run(out, ray_tmp, tiny_cache, *DISK_RUN)
    try:
        wait_for_steps(run, Path(out), 3)
        filler = fill(disk)
        seen["output"] = run.communicate(timeout=300)[0]
        seen["code"], seen["checkpoints"] = run.returncode, _checkpoints(Path(out))
        seen["lock_left"] = os.path.exists(os.path.join(out, LOCK_NAME))
        os.remove(filler)  # room again
        resumed = start_run(out, ray_tmp, tiny_cache, *DISK_RUN, "resume=auto")
        seen["resumed_output"] = resumed.communicate(timeout=600)[0]
        seen["resumed_code"], seen["rows"] = resumed.returncode, metric_rows(Path(out))
    except BaseException:  # noqa: BLE001 — told to the test, which runs in the main thread
        seen["error"] = traceback.format_exc()
    finally:
        if run.poll() is None:
            run.kill()


@pytest.fixture(scope="module")
def full_disk(tiny_cache):
    """The full-disk scenario, started at once and driven in a thread (it used to run after the HTTP runs) ->
    (what it saw, the disk, the thread)."""
    with small_disk() as (disk, why_not), short_tmp("fd") as ray_tmp:
        if disk is None:
            yield None, why_not, None
            return
        seen: dict = {}
        worker = threading.Thread(target=fill_then_resume, args=(disk, ray_tmp, tiny_cache, seen), daemon=True)
        worker.start()
        yield seen, disk, worker
        worker.join(timeout=900)


def test_a_full_disk_is_one_line_and_a_resume_completes_once_there_is_room(full_disk):
    seen, disk, worker = full_disk
    if seen is None:
        pytest.skip(f"cannot mount a small tmpfs here: {disk}")
    worker.join(timeout=900)
    assert not worker.is_alive() and "error" not in seen, seen.get("error")
    out = os.path.join(disk, "run")
    output = seen["output"]
    errors = [line for line in output.strip().splitlines() if "error" in line.lower() or "Errno" in line]
    assert seen["code"] == 1 and len(errors) == 1, output[-4000:]
    valid = seen["checkpoints"][-1]
    assert re.search(rf"error: no space left on the device of {out}\S* \(file system at {disk}, [\d.]+ \w+ "
                     rf"free now\); checkpoints up to step {int(valid[5:])} in {out}/checkpoints remain valid; free "
                     r"space and rerun with resume=auto$", errors[0]), errors[0]
    assert "Traceback" not in output and "Exception in thread" not in output, output[-4000:]
    assert not seen["lock_left"]
    assert seen["resumed_code"] == 0 and f"resumed from {out}/checkpoints/{valid}" in seen["resumed_output"], \
        seen["resumed_output"][-3000:]
    assert [row["step"] for row in seen["rows"]] == list(range(1, 9))
