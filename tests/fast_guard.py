"""The fast tier's guard: a test that is not marked ``e2e`` may not start heavy work.

While a fast-tier test sets up and runs, these fail at once with an error that says to mark the test ``e2e``:
``ray.init``, constructing a ``vllm.LLM`` (however it was imported: the class's ``__init__`` is wrapped),
``deepspeed.initialize``, a ``subprocess`` (``Popen``, so also ``run``/``check_output``/``call``) and a
``multiprocessing`` process start. The one exception: a subprocess that runs a system tool of CHEAP_TOOLS (libraries
ask ``fc-list`` for fonts, ``uname`` and ``file`` for the processor, ``git`` for the commit); a Python, a shell or
anything else is refused. The wrappers are installed once and only check a flag, so an e2e test pays nothing; ray,
vllm and deepspeed are never imported by the guard itself: a module already imported is wrapped at once, one imported
later is wrapped as its import finishes (a meta-path hook). Teardown is not guarded: a module's e2e fixture may be
torn down after its last (fast) test.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import multiprocessing.process
import os
import subprocess
import sys

CHEAP_TOOLS = frozenset({"fc-list", "uname", "file", "lscpu", "git", "ps", "true", "ldconfig"})

_active: str | None = None  # the node id of the fast-tier test now guarded, or None


class FastTierViolation(RuntimeError):
    pass


def _refuse(what: str) -> None:
    raise FastTierViolation(f"{_active} is in the fast tier but starts {what}: mark it "
                            f"@pytest.mark.e2e (or move the heavy part into an e2e test)")


def _guarded(what: str, original):
    if getattr(original, "_fast_guard", False):
        return original

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if _active is not None:
            _refuse(what)
        return original(*args, **kwargs)

    wrapper._fast_guard = True
    return wrapper


def _guarded_popen_init(original):
    if getattr(original, "_fast_guard", False):
        return original

    @functools.wraps(original)
    def wrapper(self, args, *rest, **kwargs):
        if _active is not None:
            program = args if isinstance(args, (str, bytes)) else (list(args) or [""])[0]
            name = os.path.basename(os.fsdecode(program))
            if kwargs.get("shell") or name not in CHEAP_TOOLS:
                _refuse(f"a subprocess ({name})")
        return original(self, args, *rest, **kwargs)

    wrapper._fast_guard = True
    return wrapper


def _wrap_ray(module) -> None:
    module.init = _guarded("ray.init", module.init)


def _wrap_deepspeed(module) -> None:
    module.initialize = _guarded("deepspeed.initialize", module.initialize)


def _wrap_vllm_llm(module) -> None:
    module.LLM.__init__ = _guarded("vllm.LLM", module.LLM.__init__)


_HOOKS = {"ray": _wrap_ray, "deepspeed": _wrap_deepspeed, "vllm.entrypoints.llm": _wrap_vllm_llm}


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the modules in _HOOKS it lets the other finders find the spec, then wraps the
    loader's exec_module so the module is patched once it has loaded."""

    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            hook(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


_installed = False


def install() -> None:
    """Wraps what is imported already, and everything else as it is imported. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    subprocess.Popen.__init__ = _guarded_popen_init(subprocess.Popen.__init__)
    multiprocessing.process.BaseProcess.start = _guarded("a multiprocessing process",
                                                          multiprocessing.process.BaseProcess.start)
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _WrapOnImport())


def activate(nodeid: str | None) -> None:
    global _active
    _active = nodeid
