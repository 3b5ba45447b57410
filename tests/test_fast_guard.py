"""The fast tier's guard (tests/fast_guard.py): in a test not marked e2e, ray.init, a vllm.LLM, deepspeed.initialize,
a subprocess and a multiprocessing start fail loudly, naming the test and saying to mark it e2e; a cheap system tool
may still run. This test is itself in the fast tier: it is the guard, switched on by conftest's hooks, that stops
each call (before anything starts: the calls' arguments would not even start an engine)."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

from tests import fast_guard

REFUSED = r"test_fast_guard\.py::test_each_heavy_start_fails_loudly_in_a_fast_test is in the fast tier but starts {}: " \
          r"mark it @pytest.mark.e2e"


def test_each_heavy_start_fails_loudly_in_a_fast_test():
    assert fast_guard._active is not None and fast_guard._active.endswith(
        "test_each_heavy_start_fails_loudly_in_a_fast_test")

    import ray
    ray_was_up = ray.is_initialized()  # the full suite's shared session may be up already: nothing may change
    with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"ray\.init")):
        ray.init(address="local", num_cpus=1)
    assert ray.is_initialized() == ray_was_up

    import deepspeed
    with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"deepspeed\.initialize")):
        deepspeed.initialize(model=None)

    import vllm
    from vllm.entrypoints.llm import LLM
    assert vllm.LLM is LLM
    with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"vllm\.LLM")):
        vllm.LLM(model="/nonexistent")

    for command, kwargs in (([sys.executable, "-c", "pass"], {}), ("true", {"shell": True}),
                            (["bash", "-c", "true"], {})):
        with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"a subprocess \([^)]*\)")):
            subprocess.run(command, **kwargs)
    with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"a subprocess \([^)]*\)")):
        subprocess.check_output([sys.executable, "-V"])

    process = multiprocessing.get_context("spawn").Process(target=print)
    with pytest.raises(fast_guard.FastTierViolation, match=REFUSED.format(r"a multiprocessing process")):
        process.start()
    assert process._popen is None  # refused before anything started

    assert subprocess.run(["true"]).returncode == 0  # a cheap system tool is let through


def test_off_the_guard_passes_every_call_through(monkeypatch):
    """The wrappers call the originals when no fast-tier test is running (an e2e test, or teardown)."""
    monkeypatch.setattr(fast_guard, "_active", None)
    assert subprocess.run([sys.executable, "-c", "import sys; sys.exit(3)"]).returncode == 3
