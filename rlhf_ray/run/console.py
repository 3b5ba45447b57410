"""What the driver prints, and where everything else goes (``logging.console``).

quiet (default): the console gets this project's milestones (INFO and up from ``rlhf_ray.*``) and any
library's errors; every record, libraries' INFO and warnings included, goes to
``<output_dir>/logs/driver.log``. The actors write their own output to ``logs/<role>-<i>.log``
(``rlhf_ray.actors.role.Role``). verbose: everything on the console, as the libraries configure it.

Quiet, some records go to driver.log only (``FILE_ONLY``): the traceback of a full disk (the console has its one
line), and those of uncaught errors in other threads (one line each on the console; none for a full disk, which the
driver reports itself).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path

CONSOLE_FORMAT = "%(asctime)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# libraries that attach their own console handlers instead of propagating to the root logger
_OWN_HANDLERS = ("transformers", "datasets", "DeepSpeed", "ray", "vllm")


# extra= of a record that belongs in driver.log only: the full traceback of an error the console told in one line
FILE_ONLY = {"file_only": True}


class _OursOrErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        return record.name.startswith("rlhf_ray") or record.levelno >= logging.ERROR


class _DriverLogFile(logging.FileHandler):
    """driver.log, which a full disk must not turn into a "--- Logging error ---" traceback per record on the
    console: a record that cannot be written is dropped (the run reports the full disk itself, in one line)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def setup_console(mode: str, output_dir: str | Path) -> Path | None:
    """Configure the driver's logging for ``mode`` ('quiet' | 'verbose'); returns the driver log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(console)
    if mode != "quiet":
        console.setFormatter(logging.Formatter(FILE_FORMAT))
        return None
    console.addFilter(_OursOrErrors())
    log_file = Path(output_dir) / "logs" / "driver.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = _DriverLogFile(log_file)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(file_handler)
    logging.captureWarnings(True)  # Python warnings -> the 'py.warnings' logger -> the file
    threading.excepthook = _thread_error_to_log
    with open(log_file, "a") as stream, contextlib.redirect_stdout(stream):
        from rlhf_ray.runtime.builds import import_deepspeed

        import_deepspeed()  # (imported anyway via accelerate; it logs to stdout as it loads)
        import ray  # noqa: F401  (it attaches its console handler when imported: before the handlers go, below)
    for name in _OWN_HANDLERS:     # their records take the root's handlers (file; console if errors)
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    _quiet_progress_bars()
    return log_file


def _thread_error_to_log(args: threading.ExceptHookArgs) -> None:
    """An uncaught error in a thread (TensorBoard's writer on a full disk, say): its traceback to driver.log, one line
    on the console — none for a full disk, which the driver reports itself when its next write fails."""
    from rlhf_ray.run.disk_full import is_disk_full

    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    error = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger("rlhf_ray.run.console").error("thread %s failed: %s", name, error,
                                                exc_info=(args.exc_type, error, args.exc_traceback), extra=FILE_ONLY)
    if not is_disk_full(error):
        logging.getLogger("rlhf_ray.run.console").error("thread %s failed: %s: %s (traceback in driver.log)", name,
                                                    args.exc_type.__name__, error)


def _quiet_progress_bars() -> None:
    """Loading bars of datasets / transformers / the hub would interleave with the step bar."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    huggingface_hub.utils.disable_progress_bars()
