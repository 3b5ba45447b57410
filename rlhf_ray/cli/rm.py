"""Reward models as shared Ray Serve applications, in versions: deployed once, scored by any number of experiments.

    ray start --head --num-cpus=4 --dashboard-host=127.0.0.1
    python -m rlhf_ray.rm serve my-rm --model tiny:reward --num-cpus 0.25      # my-rm@v1, route /my-rm/v1
    python -m rlhf_ray.train models.reward.kind=serve models.reward.app=my-rm@latest models.value_init=policy ray.address=auto
    python -m rlhf_ray.rm serve my-rm --model runs/rm2/final_model             # my-rm@v2: now latest; v1 keeps serving
    python -m rlhf_ray.rm list                  # name, version, latest, status, replicas, reserved, model, route, …
    python -m rlhf_ray.rm info my-rm@v1         # identity (version, fingerprint), counters, stored statistics
    python -m rlhf_ray.rm remove my-rm@v1

Each version vN of NAME is a Serve application of its own, ``NAME@vN``, at route ``/NAME/vN``, with its own
replicas (rlhf_ray.rewards.versions): a new version never changes the scores of a run pinned to another. A run names
``NAME@vN``, or ``NAME@latest`` (a bare NAME too), which it resolves once as it starts and records in its config.yaml
(rlhf_ray.rewards.serve.pin_reward_app). Serving an existing version again is refused unless the model (its content
fingerprint) and the scoring settings are the same (then replicas, resources and batching change in place), or
``--replace``. ``remove`` takes one version and refuses one that answered a score call recently (``--force``).

An app (``RewardModelServer``) wraps the same ``model`` backend the reward actors use
(``rlhf_ray.rewards.model.ModelBackend``: the RM's own tokenizer and template, ``encode_conversations``), so a
sample scores the same in either. Single samples from every caller are gathered into model batches by Serve
(``@serve.batch``: ``--max-batch-size``, ``--batch-wait-s``). It answers handle calls ``score(samples)`` (the
``serve`` backend) and HTTP POSTs in the rlhf-ray/reward/v1 schema (rlhf_ray.rewards.http) at ``/NAME/vN`` on
Serve's proxy, which listens on 127.0.0.1 (``--http-port``), so the ``http`` backend can use it as well (pinned to
that version by its URL). ``info()`` reports the app's identity (name, version, model, model_path, fingerprint,
process id, requests served, seconds since its last score call) and the RM's stored score statistics.

Ray's trap: once any local ``ray.init()`` has run on a machine, a head started later uses token auth and every
client (this CLI, the experiments) needs ``RAY_AUTH_MODE=token`` in its environment.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ray import serve

from rlhf_ray.config.reward import LATEST, VERSION, parse_app
from rlhf_ray.rewards.serve import DEFAULT_HTTP_PORT, RewardModelServer, app_handle, deployed_apps, resolve
from rlhf_ray.rewards.versions import (latest_app, model_fingerprint, next_version, route_prefix, serve_app_name,
                                       versions_of)

# ``rm remove`` refuses a version that answered a score call within this many seconds (unless --force): a run scores
# once per step, and the slowest steps documented here take 72 s (PPO on SmolLM2 on CPU, docs/tulu-suite.md), so a
# run still scoring with the version has called it within a few of them
IN_USE_S = 300.0

# ------------------------------------------------------------------------------------------------ CLI

def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (else RAY_ADDRESS, else the one on this machine); never start one: an
    app in a Ray that dies with this command would serve nobody."""
    import ray

    if ray.is_initialized():  # a second command in one process (a script calling main() for each) keeps it
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as err:
        raise SystemExit(f"error: no Ray cluster at {target!r} ({str(err).splitlines()[0]}): start one with "
                         "`ray start --head …` or pass --address") from None


def proxy_url() -> str:
    """Where Serve's HTTP proxy listens (an already running Serve keeps the options it was started with)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return f"http://{http.host}:{http.port}"


def check_capacity(replicas: int, num_cpus: float, num_gpus: float) -> None:
    """Serve waits forever for replicas the cluster cannot place: say so now."""
    import ray

    free = ray.available_resources()
    for resource, need in (("CPU", replicas * num_cpus), ("GPU", replicas * num_gpus)):
        if need > free.get(resource, 0.0) + 1e-9:
            raise SystemExit(f"error: the app needs {need:g} {resource} (--replicas × --num-{resource.lower()}s) and "
                             f"the cluster has {free.get(resource, 0.0):g} free; lower them or add capacity")


def split_target(text: str, version: str | None = None) -> tuple[str, str | None]:
    """``NAME`` or ``NAME@vN`` (and ``--version vN``) -> (NAME, 'vN' or None); SystemExit with the form otherwise."""
    try:
        name, given = parse_app(text)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    given = None if given == LATEST else given
    if version is not None:
        if not VERSION.fullmatch(version):
            raise SystemExit(f"error: --version {version!r} is not vN (v1, v2, …): versions are numbered so that "
                             "latest is the highest")
        if given not in (None, version):
            raise SystemExit(f"error: {text!r} and --version {version} name two versions; give one")
        given = version
    return name, given


def scoring_identity(info: dict) -> dict:
    """What a version's scores depend on: a redeploy that keeps these keeps every pinned run's scores."""
    return {key: info.get(key) for key in ("fingerprint", "template", "max_length", "dtype")}


def check_redeploy(app: str, info: dict | None, wanted: dict, replace: bool) -> str:
    """An existing version is redeployed only with the same model and scoring settings (a change of replicas,
    resources or batching), or with --replace. Returns what the redeploy does, for the console."""
    if replace:
        return "replaced (--replace)"
    if info is None:
        raise SystemExit(f"error: {app} exists and is not an RM app of this project; pass --replace to replace it")
    changed = [f"{key} {info.get(key)!r} -> {value!r}" for key, value in wanted.items() if info.get(key) != value]
    if changed:
        raise SystemExit(f"error: {app} is deployed with another model or scoring ({'; '.join(changed)}): runs "
                         f"pinned to it would get other scores; deploy a new version (leave out --version) or pass "
                         f"--replace")
    return "updated in place (same model and scoring; replicas, resources or batching as given)"


def app_info(app: str, timeout_s: float = 10.0) -> dict | None:
    """Serve application ``app``'s ``info()``; None for an app that is not one of this project's RMs (or not up)."""
    try:
        return serve.get_app_handle(app).info.remote().result(timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 — not an RM app of this project: its name and status are all there is to show
        return None


def cmd_serve(args) -> int:
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.run.preflight import PreflightError, check_model_path

    name, version = split_target(args.name, args.version)
    try:
        path = resolve_model(args.model, args.cache_dir, args.seed)
        check_model_path(args.model, path, "--model")
    except (PreflightError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    fingerprint = model_fingerprint(path)
    connect(args.address)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    apps = deployed_apps()
    version = version or next_version(name, apps)
    app, route = serve_app_name(name, version), route_prefix(name, version)
    wanted = {"fingerprint": fingerprint, "template": args.template, "max_length": args.max_length,
              "dtype": args.dtype}
    if app in apps:  # redeploying a version reuses its own resources
        done = check_redeploy(app, app_info(app), wanted, args.replace)
    else:
        check_capacity(args.replicas, args.num_cpus, args.num_gpus)
        done = "deployed"
    url = f"{proxy_url()}{route}"
    deployment = RewardModelServer.options(
        num_replicas=args.replicas, ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus})
    bound = deployment.bind(app=name, version=version, fingerprint=fingerprint, model=args.model, model_path=path,
                            template=args.template, max_length=args.max_length, max_batch_size=args.max_batch_size,
                            batch_wait_s=args.batch_wait_s, dtype=args.dtype, num_cpus=args.num_cpus,
                            num_gpus=args.num_gpus, url=url)
    serve.run(bound, name=app, route_prefix=route)  # returns once the replicas are up
    latest = latest_app(name, deployed_apps())
    print(f"{app}: RUNNING ({done}), model {args.model} ({path}, fingerprint {fingerprint[:12]}), "
          f"{args.replicas} replica(s), route {url}; {name}@latest is {latest}\n"
          f"experiments: models.reward.kind=serve models.reward.app={app} (or {name}@latest, resolved when a run "
          f"starts) ray.address=<this cluster>; or models.reward.kind=http models.reward.url={url}")
    return 0


def version_rows(applications: dict, infos: dict[str, dict | None]) -> list[dict]:
    """One row per Serve application (``applications``: serve.status().applications; ``infos``: each one's info(),
    None for apps that are not RMs of this project): name, version, latest, status, replicas (running/target),
    reserved (target replicas × CPUs and GPUs per replica), model, fingerprint, route, path."""
    names = list(applications)
    rows = []
    for app, status in sorted(applications.items()):
        states = [d.replica_states for d in status.deployments.values()]
        running, target = sum(s.get("RUNNING", 0) for s in states), sum(sum(s.values()) for s in states)
        info = infos.get(app) or {}
        name = info.get("app") or app.partition("@")[0]
        cpus, gpus = info.get("num_cpus"), info.get("num_gpus")
        reserved = "-" if cpus is None else f"{target} × {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        rows.append({"name": name, "version": info.get("version") or "-",
                     "latest": "latest" if info and latest_app(name, names) == app else "-",
                     "status": str(getattr(status.status, "value", status.status)), "replicas": f"{running}/{target}",
                     "reserved": reserved, "model": info.get("model", "-"),
                     "fingerprint": str(info.get("fingerprint") or "-")[:12], "route": info.get("url", "-"),
                     "path": info.get("model_path", "-"), "app": app})
    return rows


COLUMNS = ("name", "version", "latest", "status", "replicas", "reserved", "model", "fingerprint", "route", "path")


def render_table(rows: list[dict]) -> str:
    """``rows`` as a table under upper-case headers, columns as wide as their widest cell."""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = [dict(zip(COLUMNS, (c.upper() for c in COLUMNS))), *rows]
    return "\n".join("  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS).rstrip() for row in lines)


def cmd_list(args) -> int:
    connect(args.address)
    applications = serve.status().applications
    infos = {app: app_info(app) if status.status.value == "RUNNING" else None
             for app, status in applications.items()}
    rows = version_rows(applications, infos)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no Serve applications on this cluster (deploy one: python -m rlhf_ray.rm serve NAME --model …)")
    else:
        print(render_table(rows))
    return 0


def cmd_info(args) -> int:
    connect(args.address)
    try:
        info = app_handle(resolve(args.name)).info.remote().result(timeout_s=60)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


def removal_target(text: str, app_names: list[str]) -> str:
    """``rm remove``'s argument -> the Serve application to delete: a version NAME@vN, or an application named
    exactly NAME that has no versions (an unversioned RM or another app). ValueError naming what is there."""
    try:
        name, version = parse_app(text)
    except ValueError:
        name, version = text, LATEST  # another app's name, outside the RM form: only its exact name removes it
    versions = [f"{name}@v{n}" for n in versions_of(name, app_names)]
    if version == LATEST and text != name:
        raise ValueError(f"{text!r}: name the version to remove ({', '.join(versions) or 'none deployed'}); "
                         "latest moves as versions come and go")
    if version == LATEST and versions:
        raise ValueError(f"{name!r} has versions {', '.join(versions)}: remove each by its name (NAME@vN); runs "
                         "pinned to a version keep it until it is removed")
    if text not in app_names:
        raise ValueError(f"no Serve application {text!r} on this cluster (python -m rlhf_ray.rm list shows them)")
    return text


def in_use(app: str, info: dict | None, idle_s: float) -> str | None:
    """Why removing ``app`` now would stop a run (it scored a request within ``idle_s`` seconds), else None."""
    idle = (info or {}).get("idle_s")
    if idle is not None and idle < idle_s:
        return (f"{app} answered a score call {idle:.0f} s ago: a run pinned to it would stop at its next scoring "
                f"call; remove it once its runs are done (--idle-s, default {IN_USE_S:g}), or pass --force")
    return None


def cmd_remove(args) -> int:
    connect(args.address)
    apps = deployed_apps()
    try:
        app = removal_target(args.name, apps)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    busy = in_use(app, app_info(app), args.idle_s)
    if busy and not args.force:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    if busy:
        print(f"warning: {busy}", file=sys.stderr)
    serve.delete(app)
    name = app.partition("@")[0]
    latest = latest_app(name, [a for a in apps if a != app])
    print(f"{app}: removed; {name}@latest is now {latest}" if latest else f"{app}: removed")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_ray.rm", description="Reward models on Ray Serve, shared by "
                                "experiments (models.reward.kind=serve models.reward.app=NAME@vN or NAME@latest).")
    sub = p.add_subparsers(dest="command", required=True)
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="Ray cluster (host:port, 'auto'); default: RAY_ADDRESS, else 'auto'")

    s = sub.add_parser("serve", parents=[address], help="deploy version vN of RM NAME as Serve application NAME@vN at "
                       "/NAME/vN (the next number unless --version)")
    s.add_argument("name", help="NAME, or NAME@vN (as --version vN)")
    s.add_argument("--version", help="the version to deploy (v1, v2, …); default: one above the highest deployed. "
                   "An existing version is redeployed only with the same model and scoring settings, else --replace")
    s.add_argument("--replace", action="store_true", help="redeploy an existing version with another model or "
                   "scoring settings (the scores of runs pinned to it change)")
    s.add_argument("--model", required=True, help="RM: local path, hub name or tiny:reward")
    s.add_argument("--template", choices=("tulu", "tokenizer"), default="tulu",
                   help="how conversations are rendered for the RM (as models.reward.template)")
    s.add_argument("--max-length", type=int, default=1024, help="RM input tokens (the end is kept)")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    s.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    s.add_argument("--max-batch-size", type=int, default=16, help="samples per model batch (@serve.batch)")
    s.add_argument("--batch-wait-s", type=float, default=0.01, help="longest wait to fill a batch")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    s.add_argument("--http-port", type=port_number, default=DEFAULT_HTTP_PORT,
                   help="port of Serve's HTTP proxy on 127.0.0.1 (when this starts Serve on the cluster)")
    s.add_argument("--cache-dir", help="where tiny:* models are built (as models.cache_dir)")
    s.add_argument("--seed", type=int, default=0, help="seed of tiny:* models")
    s.set_defaults(run=cmd_serve)
    ls = sub.add_parser("list", parents=[address], help="the cluster's Serve applications: each RM version with its "
                        "status, replicas, reserved resources, model, fingerprint, route, and which is latest")
    ls.add_argument("--json", action="store_true", help="the rows as JSON")
    ls.set_defaults(run=cmd_list)
    info = sub.add_parser("info", parents=[address], help="NAME@vN's (or NAME@latest's) identity (version, model, "
                          "fingerprint, pid, requests served) and stored score statistics, as JSON")
    info.add_argument("name")
    info.set_defaults(run=cmd_info)
    rm = sub.add_parser("remove", parents=[address], help="delete version NAME@vN (its replicas; runs pinned to it "
                        "stop at their next scoring call), or an unversioned application NAME")
    rm.add_argument("name")
    rm.add_argument("--idle-s", type=float, default=IN_USE_S, help="refuse while the version answered a score call "
                    "within this many seconds")
    rm.add_argument("--force", action="store_true", help="remove it even so")
    rm.set_defaults(run=cmd_remove)
    return p


def port_number(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535): the route printed must be the real one")
    return port


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line per app operation is this CLI's own
    return args.run(args)
