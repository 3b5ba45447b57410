"""Rewards over HTTP: the versioned JSON schema, its client (``models.reward.kind: http``) and a reference server.

Schema ``rlhf-ray/reward/v1`` — the one definition; docs/reward-models.md quotes it.

Request: ``POST <url>`` with ``Content-Type: application/json``::

    {"schema": "rlhf-ray/reward/v1",
     "samples": [{"messages": [{"role": "user", "content": "Write a haiku."},
                               {"role": "assistant", "content": "<the response>"}],
                  "prompt": "<|user|>\\nWrite a haiku.\\n<|assistant|>\\n",
                  "response": "<the response>"},
                 ...]}

- ``messages``: the whole conversation — the prompt's turns, then the response as the final assistant turn.
  A reward model renders it with its own tokenizer and chat template (it need not share the policy's).
- ``prompt``: the prompt text exactly as the policy saw it (rendered with ``data.template``).
- ``response``: the generated text.
- ``label`` (only where the prompt data has one: ``data.label_field``): the prompt's reference answer, as text —
  what a remote verifier checks the response against.

Response: HTTP 2xx with a JSON body::

    {"schema": "rlhf-ray/reward/v1", "scores": [0.73, -1.2, ...]}

- ``scores``: one finite number per sample, in the order of ``samples`` (JSON numbers; no booleans, strings,
  nulls, NaN or Infinity).

Errors: a server answers a request it cannot score with a non-2xx status, ideally with
``{"schema": "rlhf-ray/reward/v1", "error": "<why>"}``. The client retries connection errors and HTTP
429/500/502/503/504 (``models.reward.retries``, exponential back-off ``models.reward.backoff_s``), then keeps trying
through an outage of up to ``models.reward.outage_s``; a request that takes longer than ``models.reward.timeout_s``
is not retried. Anything else that is not a valid v1 answer stops the run with a message naming the endpoint.

Versioning: ``schema`` names the version in both directions. Readers ignore fields they do not know, so v1 may
gain optional fields; a change that breaks a v1 reader gets a new name (``rlhf-ray/reward/v2``). A server answers a
request whose ``schema`` it does not speak with HTTP 400.

Health (optional, served by the reference server here): ``GET <base>/health`` → 200.

Version (optional): ``GET <url>/info`` → ``{"schema": "rlhf-ray/reward/v1", "version": "<string>"}``: a name for
what the endpoint computes, changed whenever its scores may change. Only an endpoint that declares one has its scores
cached (``models.reward.cache``, rlhf_ray.rewards.cache): the version is part of the cache key. The reference server
declares ``--version``, by default a hash of its function's name, kwargs and source code.

Put any Python scorer ``f(prompt, response) -> float`` behind this schema (loopback by default)::

    python -m rlhf_ray.rewards.http --function rlhf_ray.rewards:concise_answer --port 8001
    python -m rlhf_ray.train models.reward.kind=http models.reward.url=http://127.0.0.1:8001/ models.value_init=policy
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCHEMA = "rlhf-ray/reward/v1"
RETRY_STATUSES = (429, 500, 502, 503, 504)
SAMPLE_FIELDS = ("messages", "prompt", "response")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- the schema

def request_body(samples: list[dict]) -> dict:
    """A v1 request for ``samples`` (dicts with messages, prompt, response)."""
    return {"schema": SCHEMA, "samples": samples}


def parse_request(body: bytes) -> list[dict]:
    """The samples of a v1 request; ValueError saying what is wrong (the server answers it with HTTP 400)."""
    try:
        request = json.loads(body)
    except ValueError as err:
        raise ValueError(f"the request body is not JSON: {err}") from None
    if not isinstance(request, dict) or request.get("schema") != SCHEMA:
        got = request.get("schema") if isinstance(request, dict) else type(request).__name__
        raise ValueError(f"schema {got!r} is not spoken here; send {SCHEMA!r}")
    samples = request.get("samples")
    if not isinstance(samples, list) or not all(isinstance(s, dict) and all(f in s for f in SAMPLE_FIELDS)
                                                for s in samples):
        raise ValueError(f"'samples' must be a list of objects with {', '.join(SAMPLE_FIELDS)}")
    for i, sample in enumerate(samples):  # an empty response is a valid sample: it gets a score like any other
        messages = sample["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ValueError(f"sample {i}: 'messages' must be a non-empty list of {{role, content}} strings")
        if not isinstance(sample["prompt"], str) or not isinstance(sample["response"], str):
            raise ValueError(f"sample {i}: 'prompt' and 'response' must be strings")
    return samples


def parse_scores(text: str, expected: int, endpoint: str) -> list[float]:
    """The scores of a v1 response body, checked: ValueError naming ``endpoint`` for anything but one finite
    number per sample."""
    where = f"reward endpoint {endpoint}"
    try:
        answer = json.loads(text)  # Python's json reads NaN/Infinity literals: caught as non-finite below
    except ValueError:
        raise ValueError(f"{where} answered with something that is not JSON: {text[:200]!r}") from None
    schema = answer.get("schema") if isinstance(answer, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{where} answered schema {schema!r}, expected {SCHEMA!r} (see rlhf_ray/rewards/http.py): "
                         f"{text[:200]!r}")
    scores = answer.get("scores")
    if not isinstance(scores, list):
        raise ValueError(f"{where} answered without a 'scores' list: {text[:200]!r}")
    if len(scores) != expected:
        raise ValueError(f"{where} answered {len(scores)} scores for {expected} samples; it must give one per sample")
    for i, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where} answered score {i} = {value!r} ({type(value).__name__}); scores must be numbers")
        if not math.isfinite(value):
            raise ValueError(f"{where} answered score {i} = {value}; scores must be finite")
    return [float(value) for value in scores]


# ------------------------------------------------------------------------------------- the client

class RewardEndpointDown(RuntimeError):
    """The endpoint could not be reached, or kept answering HTTP 429/5xx, past the client's retries and outage time."""


@dataclass(frozen=True)
class _Failure:
    reason: str   # short: for the outage notices
    message: str  # what the error says when nothing more is waited for (outage_s=0)


OUTAGE_RETRY_MAX_S = 10.0  # the longest pause between tries during an outage (and at most a tenth of outage_s)


class RewardClient:
    """Scores samples at a v1 endpoint: one POST per call, retried with back-off by urllib3 for connection errors
    and HTTP 429/5xx (POST is idempotent here: scoring changes nothing), never for a slow answer (``timeout_s``
    bounds each attempt; a retried timeout would multiply the wait).

    ``outage_s`` > 0 rides out an outage: a request still failing after its retries is tried again, with back-off up
    to OUTAGE_RETRY_MAX_S (and outage_s / 10) apart, until the endpoint has been down that long (counted from its
    first failure to the next answer, across calls). Meanwhile the outage is logged here when it begins and once a
    minute, and recorded for the driver's console (rlhf_ray.rewards.outage)."""

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 headers: dict | None = None, outage_s: float = 0.0):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util import Retry

        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.outage_s, self.down_since, self._logged = outage_s, None, None
        self._record = None  # rlhf_ray.rewards.outage.OutageRecord, made at the first outage
        retry = Retry(total=retries, connect=retries, status=retries, read=False, backoff_factor=backoff_s,
                      status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"POST"}),
                      raise_on_status=False)  # the last answer comes back: its status and body go in the error
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retry))

    def score(self, samples: list[dict]) -> list[float]:
        """One finite score per sample, in order; RuntimeError (transport) or ValueError (content) naming the URL."""
        longest = min(OUTAGE_RETRY_MAX_S, self.outage_s / 10)  # a short outage_s: back soon after the endpoint is
        body, pause = request_body(samples), min(max(self.backoff_s, 0.5), longest)
        while True:
            tried = time.monotonic()
            response, failure = self._post(body)
            if failure is None:
                self._answered()
                return parse_scores(response.text, len(samples), self.url)
            time.sleep(min(pause, self._wait_left(failure, tried)))  # raises RewardEndpointDown when none is left
            pause = min(2 * pause, longest)

    def version(self) -> str | None:
        """The version the endpoint declares (GET <url>/info), or None: it declares none, or does not answer."""
        import requests

        info_url = self.url.rstrip("/") + "/info"
        try:
            answer = self.session.get(info_url, timeout=self.timeout_s)
            version = answer.json().get("version") if answer.status_code == 200 else None
        except (requests.RequestException, ValueError, AttributeError) as err:
            log.info("reward endpoint %s: no version from GET %s (%s)", self.url, info_url, _root_cause(err))
            return None
        return str(version) if version is not None else None

    def _post(self, body: dict):
        """(response, None) for an answer to read; (None, _Failure) for one worth trying again later."""
        import requests

        where = f"reward endpoint {self.url}"
        try:
            response = self.session.post(self.url, json=body, timeout=self.timeout_s)
        except requests.ConnectTimeout as err:  # nothing answered at all: the endpoint is unreachable
            return None, self._unreachable(err)
        except requests.Timeout:
            raise RuntimeError(f"{where} did not answer within {self.timeout_s:g} s "
                               "(models.reward.timeout_s)") from None
        except requests.RequestException as err:
            return None, self._unreachable(err)
        if response.status_code in RETRY_STATUSES:
            return None, _Failure(f"HTTP {response.status_code}", f"answered HTTP {response.status_code} (after up "
                                  f"to {self.retries} retries): {response.text[:200]!r}")
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"{where} answered HTTP {response.status_code} (after up to {self.retries} retries): "
                               f"{response.text[:200]!r}")
        return response, None

    def _unreachable(self, err: BaseException) -> _Failure:
        return _Failure(_os_reason(err), f"cannot be reached after {self.retries} retries (models.reward.retries): "
                                         f"{_root_cause(err)}")

    def _wait_left(self, failure: _Failure, tried: float) -> float:
        """Seconds the outage may still last (it began when the first failed request was sent, ``tried``);
        RewardEndpointDown once it has lasted outage_s. Says so when it begins and once a minute."""
        from rlhf_ray.rewards.outage import NOTICE_S, OutageRecord, notice

        if self.outage_s <= 0:
            raise RewardEndpointDown(f"reward endpoint {self.url} {failure.message}")
        now = time.monotonic()
        self.down_since = self.down_since if self.down_since is not None else tried
        down_for = now - self.down_since
        if down_for >= self.outage_s:
            if self._record is not None:  # no "reachable again" on the driver's console
                self._record.gave_up()
            self.down_since = self._logged = None  # a later call (if any) counts a new outage
            raise RewardEndpointDown(f"reward endpoint {self.url} unreachable for {down_for:.0f} s, as long as "
                                     f"models.reward.outage_s={self.outage_s:g} allows; last: {failure.message}")
        self._record = self._record or OutageRecord()
        self._record.down(self.url, down_for, failure.reason, self.outage_s)
        if self._logged is None or now - self._logged >= NOTICE_S:
            log.warning("%s", notice({"url": self.url, "seconds": down_for, "reason": failure.reason,
                                      "limit_s": self.outage_s}))
            self._logged = now
        return self.outage_s - down_for

    def _answered(self) -> None:
        if self.down_since is not None:
            log.warning("reward endpoint %s reachable again after %.0f s", self.url, time.monotonic() - self.down_since)
            self.down_since = self._logged = None
            if self._record is not None:
                self._record.up()

    def close(self) -> None:
        self.session.close()


def _os_reason(err: BaseException) -> str:
    """The operating system's reason inside a requests/urllib3 error, short (``ConnectionRefusedError: Connection
    refused``), for the outage notices; the whole root cause where there is none."""
    pending, seen = [err], set()
    while pending:
        cause = pending.pop()
        if not isinstance(cause, BaseException) or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return f"{type(cause).__name__}: {cause.strerror}"
        pending += [*getattr(cause, "args", ()), getattr(cause, "reason", None), cause.__context__, cause.__cause__]
    return _root_cause(err)


def _root_cause(err: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error chain (e.g. 'Connection refused'), one line."""
    reason = getattr(getattr(err, "args", [None])[0], "reason", None) or err
    return str(reason).splitlines()[0][:200]


# ------------------------------------------------------------------------------------- the reference server

class RewardServer:
    """A v1 endpoint in a background thread (stdlib ``ThreadingHTTPServer``): POST to any path scores, GET /health
    answers 200, GET /info the ``version`` (None: declares none). ``url`` is where to POST; ``requests`` counts the
    scoring requests answered."""

    def __init__(self, score_samples, host: str = "127.0.0.1", port: int = 0, version: str | None = None):
        self.score_samples, self.requests, self._lock = score_samples, 0, threading.Lock()
        self.version = version
        self.httpd = ThreadingHTTPServer((host, port), functools.partial(_Handler, self))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"reward-http-{self.port}", daemon=True)
        self.thread.start()

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, server: RewardServer, *args):
        self.reward_server = server
        super().__init__(*args)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/health"):
            self._answer(200, {"schema": SCHEMA, "status": "ok"})
        elif path.endswith("/info"):
            self._answer(200, {"schema": SCHEMA, "version": self.reward_server.version})
        else:
            self._answer(404, {"schema": SCHEMA, "error": "POST samples to score; GET /health or /info"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            samples = parse_request(body)
        except ValueError as err:
            return self._answer(400, {"schema": SCHEMA, "error": str(err)})
        try:
            scores = [float(s) for s in self.reward_server.score_samples(samples)]
        except Exception as err:  # the scorer's failure goes back to the client, which names this endpoint
            log.exception("scoring failed")
            return self._answer(500, {"schema": SCHEMA, "error": f"{type(err).__name__}: {err}"})
        self.reward_server.count_request()
        self._answer(200, {"schema": SCHEMA, "scores": scores})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature; one line per request is noise
        log.debug("%s " + format, self.address_string(), *args)


def serve_function(fn, host: str = "127.0.0.1", port: int = 0, version: str | None = None) -> RewardServer:
    """Serve ``fn(prompt, response) -> float`` as a v1 endpoint (loopback by default; port 0: a free one), declaring
    ``version`` (None: none, so its scores are not cached)."""
    return RewardServer(lambda samples: [fn(s["prompt"], s["response"]) for s in samples], host, port, version)


def default_version(spec: str, kwargs: dict, function) -> str:
    """The reference server's version of a function: a hash of its name, kwargs and source (rlhf_ray.rewards.cache)."""
    import hashlib

    from rlhf_ray.rewards.cache import canonical_json, function_identity

    return hashlib.sha256(canonical_json(function_identity(spec, kwargs, function)).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.rewards.base import load_function

    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.rewards.http",
                                     description=f"Serve a Python reward function over HTTP ({SCHEMA}).")
    parser.add_argument("--function", required=True, help="module:function taking (prompt, response) -> float")
    parser.add_argument("--kwargs", default="{}", help="JSON object of extra keyword arguments for the function")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--version", help="what GET /info declares (score caches key on it); default: a hash of the "
                                          "function's name, kwargs and source code")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        function = load_function(args.function, key="--function")
        version = args.version or default_version(args.function, kwargs, function)
        server = serve_function(functools.partial(function, **kwargs), args.host, args.port, version)
    except (ValueError, OSError) as err:  # a bad --function/--kwargs, or the port is taken
        parser.error(str(err))
    print(f"scoring {args.function} (version {version}) at {server.url} ({SCHEMA}); experiments: models.reward.kind=http "
          f"models.reward.url={server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
