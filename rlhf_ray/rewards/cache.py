"""The score cache (``models.reward.cache``): raw scores kept by who scored what, so that a sample scored once is not
scored again — by a later step, another run of a sweep, or a repeated evaluation.

Key: sha256 of the canonical JSON (keys sorted, no spaces, UTF-8) of ``{"identity": …, "sample": …}``:

    identity   what the backend's scores depend on besides the sample (``RewardBackend.cache_identity``):
                 function  module:function, its kwargs and a hash of the function's source code
                 model     the RM's path, a fingerprint of its files (``model_fingerprint``), template, max_length, dtype
                 http      the URL and the version the endpoint declares (GET <url>/info → {"version": …})
                 serve     the app's name and the version its info() declares
               None (an endpoint or app that declares no version): that backend is not cached, logged once.
    sample     the whole sample as a v1 request carries it: messages (the conversation, response included),
               prompt text, response, label (``RewardSample.to_json``)

Values: the RAW score (before models.reward.normalize/clip), stored as a float64 that holds the float32 score
exactly; the first score stored for a key stays (INSERT OR IGNORE), so a hit returns exactly the score first computed.

Store: an SQLite file (``DiskStore``, ``models.reward.cache=disk``) rather than a detached Ray actor: it serves every
run and evaluation that reaches the file, across clusters and restarts (a repeated evaluation starts a Ray of its
own each time; an actor's dict would go with it), needs no process to outlive its runs, and SQLite's WAL mode lets
reward actors of concurrent runs read and write it at once. On several nodes the file must be on a shared filesystem,
else each node keeps its own (never wrong, fewer hits). ``MemoryStore``: the same in one process (tests).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sqlite3
from pathlib import Path

import torch

from rlhf_ray.rewards.base import RewardBackend, RewardSample

log = logging.getLogger(__name__)

DEFAULT_CACHE_PATH = "~/.cache/rlhf_ray/reward_scores.sqlite"
SQLITE_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another run's write to the file (they take milliseconds)
SQLITE_MAX_VARIABLES = 900    # keys per SELECT … IN (…): under SQLite's default limit of 999 bound parameters
SMALL_FILE_BYTES = 16 << 20   # model files up to this size are hashed whole (configs, tokenizers); larger: by stat


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(identity: dict, sample: RewardSample) -> str:
    """The sample's key for a backend of ``identity``: same identity and sample (whatever the dict order) → same key."""
    return hashlib.sha256(canonical_json({"identity": identity, "sample": sample.to_json()}).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- identities

def function_identity(spec: str, kwargs: dict, fn) -> dict:
    """A reward function's identity: its name, kwargs and the sha256 of its source (an edited function is another
    one; a helper it calls is not covered: a changed helper needs a fresh cache_path)."""
    try:
        source = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):  # built-in or defined where no source is kept
        source = getattr(fn, "__qualname__", repr(fn))
    return {"kind": "function", "function": spec, "kwargs": kwargs,
            "code": hashlib.sha256(source.encode()).hexdigest()}


def model_fingerprint(path: str) -> str | None:
    """A cheap content fingerprint of a model directory: small files (config, tokenizer, weight index) hashed whole;
    large ones (the weights) by name, size and mtime — or, in the Hugging Face cache, by the blob they link to, which
    is named by its content hash. Copying weights changes their mtime (a miss, never a wrong hit). A hub name is
    looked up in the local HF cache; None where no directory is found (then no caching)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        try:
            import huggingface_hub

            found = huggingface_hub.try_to_load_from_cache(path, "config.json")
        except Exception:  # not a repo id either
            return None
        if not isinstance(found, str):
            return None
        directory = Path(found).parent
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file()):
        target = file.resolve()
        stat = target.stat()
        if target.parent.name == "blobs":
            part = f"{file.name}:blob:{target.name}"
        elif stat.st_size <= SMALL_FILE_BYTES:
            part = f"{file.name}:sha256:{hashlib.sha256(target.read_bytes()).hexdigest()}"
        else:
            part = f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- stores

class MemoryStore:
    """Keys to raw scores in this process (tests; a cache that ends with the process)."""

    def __init__(self):
        self.scores: dict[str, float] = {}

    def get_many(self, keys: list[str]) -> dict[str, float]:
        return {k: self.scores[k] for k in keys if k in self.scores}

    def put_many(self, items: dict[str, float]) -> None:
        for key, score in items.items():
            self.scores.setdefault(key, score)


class DiskStore:
    """Keys to raw scores in an SQLite file, shared by every process that opens it (WAL mode)."""

    def __init__(self, path: str):
        self.path = Path(os.path.expanduser(path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
        except (OSError, sqlite3.Error) as err:
            raise ValueError(f"models.reward.cache_path={str(path)!r}: cannot open it as the score cache: {err}") from None

    def get_many(self, keys: list[str]) -> dict[str, float]:
        found = {}
        for start in range(0, len(keys), SQLITE_MAX_VARIABLES):
            part = keys[start:start + SQLITE_MAX_VARIABLES]
            rows = self.db.execute(f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(part))})", part)
            found.update(rows.fetchall())
        return found

    def put_many(self, items: dict[str, float]) -> None:
        with self.db:  # one transaction
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO scores (key, score) VALUES (?, ?)", list(items.items()))


def open_store(cfg) -> DiskStore:
    return DiskStore(cfg.cache_path or DEFAULT_CACHE_PATH)


# --------------------------------------------------------------------------------------------------- the backend

class CachedBackend(RewardBackend):
    """``inner`` with a score cache in front: hits come from ``store``, the rest are scored by ``inner`` (in one call,
    in their order) and stored. Stats: cache_hits, cache_misses (totals), cache_hit_rate (mean of hit indicators)."""

    def __init__(self, inner: RewardBackend, identity: dict, store):
        super().__init__(inner.cfg)
        self.inner, self.identity, self.store = inner, identity, store

    def score(self, samples: list[RewardSample]) -> torch.Tensor:
        """Stored scores where there are; the rest scored by ``inner``, each distinct sample once (a repeat within the
        call, e.g. two equal answers to one prompt, is a hit on the first)."""
        keys = [cache_key(self.identity, s) for s in samples]
        found = self.store.get_many(list(dict.fromkeys(keys)))
        first_of = {}  # each missing key -> the first sample with it
        for i, key in enumerate(keys):
            if key not in found:
                first_of.setdefault(key, i)
        if first_of:
            fresh = self.inner.score([samples[i] for i in first_of.values()]).float()
            computed = dict(zip(first_of, fresh.tolist()))
            self.store.put_many(computed)
            found = {**computed, **found}
        self.stats.merge(self.inner.take_stats())
        hit = torch.ones(len(samples))
        hit[list(first_of.values())] = 0.0
        self.stats.add_total("cache_hits", len(samples) - len(first_of))
        self.stats.add_total("cache_misses", len(first_of))
        self.stats.add_values("cache_hit_rate", hit)
        return torch.tensor([found[k] for k in keys], dtype=torch.float32)

    def stored_statistics(self) -> dict | None:
        return self.inner.stored_statistics()

    def cache_identity(self) -> dict | None:
        return self.identity

    def describe(self) -> str:
        return self.inner.describe()

    def __getattr__(self, name):  # the inner backend's own attributes (an RM's model, for memory readings)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def with_cache(backend: RewardBackend, cfg, store=None) -> RewardBackend:
    """``backend`` behind the score cache where ``cfg.cache`` asks for one and the backend declares an identity."""
    if cfg.cache == "off":
        return backend
    identity = backend.cache_identity()
    if identity is None:
        log.warning("score cache: %s declares no version, so its scores are not cached (an HTTP endpoint declares "
                    "one in GET <url>/info, a Serve app in its info())", backend.describe())
        return backend
    return CachedBackend(backend, identity, store if store is not None else open_store(cfg))
