"""How a config that cannot run is reported: one line per problem, naming the key to change.

A rule raises ``ConfigKeyError`` with the key it is about, relative to the section that checks it; pydantic keeps
the exception in the error's ``ctx["error"]`` and records where that section sits (``loc``), so
``format_validation_error`` joins the two into the full dotted key. No message text is parsed.
"""
from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key and says how to fix it."""


class ConfigKeyError(ConfigError):
    """One rule broken: ``key`` is the dotted key to change, relative to the section whose validator raised it ('' for
    a field validator: the field itself); ``why`` says what to set."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}" if key else why)
        self.key = key
        self.why = why

    def __reduce__(self):  # pickled with both arguments (Ray ships exceptions between processes)
        return type(self), (self.key, self.why)


def require(ok, key: str, why: str) -> None:
    """Raise ``ConfigKeyError(key, why)`` unless ``ok``."""
    if not ok:
        raise ConfigKeyError(key, why)


UNKNOWN_KEY = "unknown key (check the spelling; `python -m rlhf_ray.config --help` lists the keys)"


# Keys that were replaced: what a config that still writes one is told (loading.RESHAPED reads saved configs).
REPLACED_KEYS = {"logging.tensorboard": "replaced by logging.trackers, a list: [tensorboard] (the default), "
                                       "[tensorboard, wandb, mlflow], or [] for none"}


def format_validation_error(err: ValidationError) -> str:
    """pydantic's errors as one line: ``key: message`` for each, joined by '; '."""
    lines = []
    for error in err.errors():
        path = [str(part) for part in error["loc"]]
        msg = error["msg"]
        broken_rule = (error.get("ctx") or {}).get("error")
        if isinstance(broken_rule, ConfigKeyError):
            path += [broken_rule.key] if broken_rule.key else []
            msg = broken_rule.why  # the rule's message says what it got where that helps
        elif error["type"] == "extra_forbidden":
            msg = REPLACED_KEYS.get(".".join(path), UNKNOWN_KEY)
        elif error["type"] == "missing":
            msg = "required key is missing"
        elif "input" in error and not isinstance(error["input"], dict):
            msg += f" (got {error['input']!r})"
        key = ".".join(path)
        lines.append(f"{key}: {msg}" if key else msg)
    return "; ".join(lines)
