"""What the driver prints, and where everything else goes (``logging.console``).

quiet (default): the console gets this project's milestones (INFO and up from ``rlhf_ray.*``) and any
library's errors; every record, libraries' INFO and warnings included, goes to
``<output_dir>/logs/driver.log``. The actors write their own output to ``logs/<role>-<i>.log``
(``actors.common.Role``). verbose: everything on the console, as the libraries configure it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

CONSOLE_FORMAT = "%(asctime)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# libraries that attach their own console handlers instead of propagating to the root logger
_OWN_HANDLERS = ("transformers", "datasets", "DeepSpeed", "ray", "vllm")


class _OursOrErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("rlhf_ray") or record.levelno >= logging.ERROR


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
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(file_handler)
    logging.captureWarnings(True)  # Python warnings -> the 'py.warnings' logger -> the file
    with open(log_file, "a") as stream, contextlib.redirect_stdout(stream):
        import deepspeed  # noqa: F401  (imported anyway via accelerate; it logs to stdout as it loads)
    for name in _OWN_HANDLERS:     # their records take the root's handlers (file; console if errors)
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    _quiet_progress_bars()
    return log_file


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
