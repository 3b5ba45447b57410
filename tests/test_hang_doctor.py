"""The hang doctor (rlhf_ray.runtime.stacks): a wait past its share of the timeout calls it once and goes on to the
timeout; a stuck process's stacks read by py-spy and by its own faulthandler, and the innermost frame of ours picked
out of either. In a real run (a reward actor stuck in a function): tests/test_durability.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from rlhf_ray.runtime import waiting
from rlhf_ray.runtime.stacks import innermost_ours

PY_SPY = """Process 4242: ray::RewardActor.scored
Python v3.11.7 (/usr/bin/python3.11)

Thread 4250 (idle): "ray_print_logs"
    wait (threading.py:327)
    pump (/work/main/actors/role.py:140)
Thread 4242 (idle): "MainThread"
    hang_once (/work/main/tests/hang_reward.py:11)
    score (/work/main/rlhf_ray/rewards/functions.py:58)
    _scored (/work/main/actors/reward.py:53)
    main_loop (ray/_private/worker.py:946)
"""
FAULTHANDLER = """Thread 0x00007f1c (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait
  File "/work/main/actors/role.py", line 140 in pump

Current thread 0x00007f1d (most recent call first):
  File "/work/main/tests/hang_reward.py", line 11 in hang_once
  File "/site-packages/rlhf_ray/rewards/functions.py", line 58 in score
  File "/work/main/actors/reward.py", line 53 in _scored
"""


def test_the_innermost_frame_of_ours_in_the_main_thread_from_either_tool():
    assert innermost_ours(PY_SPY) == "score (rlhf_ray/rewards/functions.py:58)"
    assert innermost_ours(FAULTHANDLER) == "score (rlhf_ray/rewards/functions.py:58)"
    assert innermost_ours(PY_SPY.replace('"MainThread"', '"other"')) == "pump (actors/role.py:140)"
    assert innermost_ours("Thread 1 (idle): \"MainThread\"\n    main_loop (ray/_private/worker.py:946)\n") is None


def test_a_wait_past_its_share_of_the_timeout_calls_the_doctor_once_and_still_times_out(monkeypatch):
    from ray.exceptions import GetTimeoutError

    def never(refs, timeout):
        time.sleep(timeout)
        raise GetTimeoutError("not yet")

    calls = []

    class Doctor:
        fraction = 0.25

        def __call__(self, *args):
            calls.append((time.monotonic(), args))

    monkeypatch.setattr(waiting.ray, "get", never)
    monkeypatch.setattr(waiting, "WAIT_SLICE_S", 0.1)
    waiting.watch(Doctor())
    try:
        start = time.monotonic()
        with pytest.raises(waiting.ActorLost, match="reward did not finish scoring within 2 s"):
            waiting.wait("ref", "reward", "scoring", 2.0, "timeouts.score_s")
    finally:
        waiting.watch(None)
    (at, (role, doing, waited, timeout, key)), = calls
    assert (role, doing, timeout, key) == ("reward", "scoring", 2.0, "timeouts.score_s")
    assert 0.5 <= waited < 1.0 and 0.5 <= at - start < 1.0


@pytest.mark.e2e
@pytest.mark.parametrize("tool", ["py-spy", "faulthandler"])
def test_a_stuck_process_stacks_name_its_function(tmp_path, tool):
    from rlhf_ray.runtime.stacks import dump_stacks

    ours = tmp_path / "rlhf_ray"
    ours.mkdir()
    (ours / "stuck.py").write_text(textwrap.dedent("""
        import sys, time
        from rlhf_ray.runtime.stacks import install_stack_dump

        def stuck_in_a_known_function():
            print(install_stack_dump(sys.argv[1]), flush=True)
            time.sleep(60)

        stuck_in_a_known_function()
    """))
    stuck = subprocess.Popen([sys.executable, str(ours / "stuck.py"), str(tmp_path / "stuck.log")],
                             stdout=subprocess.PIPE, text=True)
    try:
        stacks_file = stuck.stdout.readline().strip()  # the handler is installed
        assert stacks_file == f"{tmp_path / 'stuck.log'}.stacks"
        time.sleep(0.5)  # from the print to the sleep
        text, how = dump_stacks(stuck.pid, stacks_file, tool)
        assert how == tool, text
        line = (ours / "stuck.py").read_text().splitlines().index("    time.sleep(60)") + 1
        assert innermost_ours(text) == f"stuck_in_a_known_function (rlhf_ray/stuck.py:{line})", text
        assert stuck.poll() is None  # read, not killed
    finally:
        stuck.kill()
        stuck.wait()
