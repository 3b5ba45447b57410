"""Reward models as shared Ray Serve applications: deployed once, scored by any number of experiments.

    ray start --head --num-cpus=4 --dashboard-host=127.0.0.1
    python -m rlhf_ray.rm serve my-rm --model tiny:reward --num-cpus 0.25      # prints the app and its route
    python -m rlhf_ray.train models.reward.kind=serve models.reward.app=my-rm models.value_init=policy ray.address=auto
    python -m rlhf_ray.rm list                                                  # name, status, model, replicas, route
    python -m rlhf_ray.rm info my-rm                                            # identity, counters, stored statistics
    python -m rlhf_ray.rm remove my-rm

An app (``RewardModelServer``) wraps the same ``model`` backend the reward actors use
(``rlhf_ray.rewards.model.ModelBackend``: the RM's own tokenizer and template, ``encode_conversations``), so a
sample scores the same in either. Single samples from every caller are gathered into model batches by Serve
(``@serve.batch``: ``--max-batch-size``, ``--batch-wait-s``). It answers handle calls ``score(samples)`` (the
``serve`` backend) and HTTP POSTs in the rlhf-ray/reward/v1 schema (rlhf_ray.rewards.http) at ``/NAME`` on Serve's
proxy, which listens on 127.0.0.1 (``--http-port``), so the ``http`` backend can use it as well. ``info()`` reports
the RM's stored score statistics and the app's identity (model, process id, requests served).

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

from rlhf_ray.rewards.serve import DEFAULT_HTTP_PORT, RewardModelServer, app_handle

# ------------------------------------------------------------------------------------------------ CLI

def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (else RAY_ADDRESS, else the one on this machine); never start one: an
    app in a Ray that dies with this command would serve nobody."""
    import ray

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


def cmd_serve(args) -> int:
    from rlhf_ray.models.specs import resolve_model
    from rlhf_ray.run.preflight import PreflightError, check_model_path

    try:
        path = resolve_model(args.model, args.cache_dir, args.seed)
        check_model_path(args.model, path, "--model")
    except (PreflightError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    connect(args.address)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    url = f"{proxy_url()}/{args.name}"
    if args.name not in serve.status().applications:  # redeploying an app reuses its own resources
        check_capacity(args.replicas, args.num_cpus, args.num_gpus)
    deployment = RewardModelServer.options(
        num_replicas=args.replicas, ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus})
    app = deployment.bind(app=args.name, model=args.model, model_path=path, template=args.template,
                          max_length=args.max_length, max_batch_size=args.max_batch_size,
                          batch_wait_s=args.batch_wait_s, dtype=args.dtype, num_cpus=args.num_cpus,
                          num_gpus=args.num_gpus, url=url)
    serve.run(app, name=args.name, route_prefix=f"/{args.name}")  # returns once the replicas are up
    print(f"{args.name}: RUNNING, model {args.model} ({path}), {args.replicas} replica(s), route {url}\n"
          f"experiments: models.reward.kind=serve models.reward.app={args.name} ray.address=<this cluster>; "
          f"or models.reward.kind=http models.reward.url={url}")
    return 0


def app_rows() -> list[dict]:
    """One row per Serve application: name, status, model, replicas (running/target), route."""
    rows = []
    for name, app in sorted(serve.status().applications.items()):
        states = [d.replica_states for d in app.deployments.values()]
        running = sum(s.get("RUNNING", 0) for s in states)
        row = {"name": name, "status": app.status.value,
               "model": "-", "replicas": f"{running}/{sum(sum(s.values()) for s in states)}", "route": "-"}
        if row["status"] == "RUNNING":
            try:
                info = serve.get_app_handle(name).info.remote().result(timeout_s=10)
                row.update(model=info["model"], route=info["url"])
            except Exception:  # not an RM app of this project: its name and status are all there is to show
                pass
        rows.append(row)
    return rows


def cmd_list(args) -> int:
    connect(args.address)
    rows = app_rows()
    if not rows:
        print("no Serve applications on this cluster (deploy one: python -m rlhf_ray.rm serve NAME --model …)")
        return 0
    columns = ("name", "status", "model", "replicas", "route")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for row in [dict(zip(columns, (c.upper() for c in columns))), *rows]:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    return 0


def cmd_info(args) -> int:
    connect(args.address)
    try:
        info = app_handle(args.name).info.remote().result(timeout_s=60)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


def cmd_remove(args) -> int:
    connect(args.address)
    if args.name not in serve.status().applications:
        print(f"error: no Serve application {args.name!r} on this cluster (python -m rlhf_ray.rm list shows them)",
              file=sys.stderr)
        return 1
    serve.delete(args.name)
    print(f"{args.name}: removed")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_ray.rm", description="Reward models on Ray Serve, shared by "
                                "experiments (models.reward.kind=serve models.reward.app=NAME).")
    sub = p.add_subparsers(dest="command", required=True)
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="Ray cluster (host:port, 'auto'); default: RAY_ADDRESS, else 'auto'")

    s = sub.add_parser("serve", parents=[address], help="deploy (or redeploy) an RM application NAME at /NAME")
    s.add_argument("name")
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
    ls = sub.add_parser("list", parents=[address], help="the cluster's Serve applications")
    ls.set_defaults(run=cmd_list)
    info = sub.add_parser("info", parents=[address], help="app NAME's identity (model, pid, requests served) and "
                          "stored score statistics, as JSON")
    info.add_argument("name")
    info.set_defaults(run=cmd_info)
    rm = sub.add_parser("remove", parents=[address], help="delete application NAME")
    rm.add_argument("name")
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
