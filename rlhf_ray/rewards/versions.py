"""Versions of a shared Serve RM, worked out from the names of the cluster's Serve applications alone.

``python -m rlhf_ray.rm serve NAME`` deploys version vN of NAME as its own Serve application, named ``NAME@vN``, at
route ``/NAME/vN``, with replicas of its own: a new version never touches the replicas of another, so runs pinned to
one keep their scores while the next is deployed. Versions are numbered (v1, v2, …); ``latest`` is the highest
number deployed, so the application names are the whole record: no registry to keep in step with Serve. A bare
``NAME`` (``models.reward.app``) means ``NAME@latest``; an application named exactly ``NAME``, deployed before
versions existed, is what a bare name or ``NAME@latest`` finds where NAME has no version.

The functions here are pure (names in, names out); rlhf_ray.rewards.serve applies them to ``serve.status()``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from rlhf_ray.config.reward import LATEST, VERSION, parse_app

# bytes read from each end of a weight file for the model's fingerprint: the safetensors header (tensor names,
# shapes, dtypes) and the first tensors' values are at its start, the last tensors' values at its end, so
# retrained or re-seeded weights change both; 1 MiB keeps a 135M model (540 MB) at ~2 MiB read in a few ms
FINGERPRINT_EDGE_BYTES = 1 << 20


def serve_app_name(name: str, version: str) -> str:
    """The Serve application that holds version ``version`` ('vN') of ``name``."""
    return f"{name}@{version}"


def route_prefix(name: str, version: str) -> str:
    """Its HTTP route on Serve's proxy (one per version: an HTTP client pins its version by its URL)."""
    return f"/{name}/{version}"


def versions_of(name: str, app_names: Iterable[str]) -> list[int]:
    """The version numbers of ``name`` deployed (among ``app_names``), ascending."""
    numbers = []
    for app in app_names:
        base, sep, version = app.partition("@")
        match = VERSION.fullmatch(version) if sep and base == name else None
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def next_version(name: str, app_names: Iterable[str]) -> str:
    """The version ``rm serve NAME`` deploys when none is given: one above the highest deployed (v1 for the first)."""
    numbers = versions_of(name, app_names)
    return f"v{numbers[-1] + 1 if numbers else 1}"


def latest_app(name: str, app_names: Iterable[str]) -> str | None:
    """The Serve application ``NAME@latest`` means: the highest version of ``name``, else an unversioned application
    named ``name`` (deployed before versions), else None."""
    app_names = list(app_names)
    numbers = versions_of(name, app_names)
    if numbers:
        return serve_app_name(name, f"v{numbers[-1]}")
    return name if name in app_names else None


def resolve_app(spec: str, app_names: Iterable[str]) -> str:
    """``models.reward.app`` ('NAME', 'NAME@latest', 'NAME@vN') -> the Serve application it names on a cluster with
    ``app_names``; ValueError (one line: what is deployed, how to deploy) where there is none."""
    name, version = parse_app(spec)
    app_names = sorted(app_names)
    found = latest_app(name, app_names) if version == LATEST else serve_app_name(name, version)
    if found is not None and found in app_names:
        return found
    deployed = [f"v{n}" for n in versions_of(name, app_names)]
    have = (f"{name} has {', '.join(deployed)}" if deployed else f"no version of {name!r} is deployed")
    raise ValueError(f"models.reward.app={spec!r}: no such Ray Serve RM on this cluster ({have}); deploy it with "
                     f"`python -m rlhf_ray.rm serve {name} --model …`, and see `python -m rlhf_ray.rm list`")


def is_pinned(spec: str) -> bool:
    """Whether ``spec`` names one version (NAME@vN), not whichever is latest."""
    return parse_app(spec)[1] != LATEST


def model_fingerprint(path: str) -> str:
    """A cheap content fingerprint of the model at ``path`` (a directory): SHA-256 over every file's relative name,
    size, and its first and last ``FINGERPRINT_EDGE_BYTES`` (all of a smaller file), in name order. Retrained,
    re-seeded or re-exported weights, another tokenizer or other reward statistics give another fingerprint; the
    same files copied elsewhere give the same one. A hub name is fingerprinted from its local snapshot (whose
    directory is named by the commit), else by the name alone."""
    root = Path(path)
    if not root.is_dir():
        root = _hub_snapshot(path)
        if root is None:
            return hashlib.sha256(f"name:{path}".encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
            if size > 2 * FINGERPRINT_EDGE_BYTES:
                handle.seek(size - FINGERPRINT_EDGE_BYTES)
            digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
    return digest.hexdigest()


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 — not a hub name, or not downloaded here: the name is all there is
        return None
