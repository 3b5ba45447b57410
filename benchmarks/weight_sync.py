"""Weight sync: seconds and GB/s per transport, 1 and 2 engines, models from tiny to ~0.5B parameters, beside this
machine's memcpy bandwidth measured in the same run.

    python benchmarks/weight_sync.py [--models tiny,20m,smollm2,500m] [--engines 1,2] [--reps 3] [--skip-engines]

Two parts:
- **transfer**: the learner's fp32 weights into the receivers' own parameter tensors (each tensor copied into a
  preallocated one, as an engine must, with the node's cores), between plain Ray actors: the object store
  with pickled torch tensors (the format before issue 15), the object store with numpy buckets read in place
  (``object_store`` now), and the gloo broadcast (``collective``). This is what a transport itself costs.
- **engines**: a real learner (DeepSpeed, ZeRO-0) and real vLLM engines (``rlhf_ray.cluster.roles.Roles``), one full
  ``sync_weights()`` per transport: publish + transfer + vLLM's reload (on CPU it repacks every GEMM weight for its
  kernels, a cost no transport removes). Checked exact: the engines' logprobs of a fixed answer equal the learner's.

GB/s are the model's bytes delivered per engine divided by the wall seconds of one sync ("each engine got its
weights at …"). Prints a table and writes benchmarks/results/weight_sync.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"tiny": "tiny:policy-tied", "20m": "scaled:llama-20m", "smollm2": "real:smollm2-135m",
          "500m": "scaled:llama-500m"}
BUCKET_MB = 256


# ----------------------------------------------------------------------------------------------- memcpy
def memcpy_gbps(mb: int = 1024, reps: int = 5) -> dict:
    """torch copy_ between two preallocated buffers, 1 thread and all threads: the machine's copy bandwidth (bytes
    read = bytes written = the buffer size; GB/s counts the bytes copied once)."""
    import torch

    src = torch.ones(mb * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    out = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        dst.copy_(src)
        best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
        out[f"threads_{threads}"] = src.numel() / best / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- transfer
def model_tensors(path: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the causal LM at ``path`` (meta device: nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


class Sender:
    def __init__(self, shapes):
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.tensors = [(name, torch.randn(shape)) for name, shape in shapes]
        self.group = None

    def address(self):
        import ray

        from rlhf_ray.weights.collective import open_rendezvous

        self.listen = open_rendezvous(ray.util.get_node_ip_address())
        self.address = self.listen.getsockname()[:2]
        return self.address

    def join(self, world: int):
        from rlhf_ray.weights.collective import join

        host, port = self.address
        self.group = join(host, port, 0, world, 120, listen_socket=self.listen)

    def buckets(self):
        from rlhf_ray.weights.buckets import plan_buckets

        return plan_buckets([(n, "float32", tuple(t.shape)) for n, t in self.tensors], BUCKET_MB * 2**20)

    def publish(self, method: str):
        import ray

        from rlhf_ray.weights.collective import send
        from rlhf_ray.weights.object_store import put_bucket

        buckets, stream = self.buckets(), iter(t for _, t in self.tensors)
        if method == "collective":
            send(self.group, buckets, stream)
            return None
        if method == "object_store":
            return [put_bucket(b, [next(stream) for _ in b.slots]) for b in buckets]
        named = iter(self.tensors)  # pickled: lists of (name, torch tensor), as published before issue 15
        return [ray.put([next(named) for _ in b.slots]) for b in buckets]


class Receiver:
    def __init__(self, shapes):
        import os

        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # an engine loads with its node's cores (its phase plan)
        self.params = {name: torch.zeros(shape) for name, shape in shapes}  # an engine's own parameters

    def join(self, host, port, rank, world):
        from rlhf_ray.weights.collective import join

        self.group = join(host, port, rank, world, 120)

    def receive(self, method: str, payload, buckets):
        import ray

        from rlhf_ray.weights.collective import receive
        from rlhf_ray.weights.object_store import read_buckets

        if method == "collective":
            pairs = receive(self.group, buckets)
        elif method == "object_store":
            pairs = read_buckets(payload, 120)
        else:
            pairs = (pair for ref in payload for pair in ray.get(ref))
        for name, tensor in pairs:
            self.params[name].copy_(tensor)
        return sum(float(p.view(-1)[0]) for p in self.params.values())  # touched: the copy happened


def transfer_bench(path: str, engines: int, reps: int) -> dict:
    import ray

    shapes = model_tensors(path)
    sender = ray.remote(Sender).options(num_cpus=1).remote(shapes)
    receivers = [ray.remote(Receiver).options(num_cpus=0.5).remote(shapes) for _ in range(engines)]
    host, port = ray.get(sender.address.remote())
    ray.get([sender.join.remote(1 + engines)] + [r.join.remote(host, port, 1 + i, 1 + engines)
                                                 for i, r in enumerate(receivers)])
    buckets = ray.get(sender.buckets.remote())
    nbytes = sum(s.nbytes for b in buckets for s in b.slots)
    out = {}
    for method in ("pickled", "object_store", "collective"):
        times = []
        for rep in range(reps + 1):  # the first is a warm-up
            start = time.perf_counter()
            if method == "collective":
                ray.get([sender.publish.remote(method)] + [r.receive.remote(method, None, buckets) for r in receivers])
            else:
                refs = ray.get(sender.publish.remote(method))
                ray.get([r.receive.remote(method, refs, buckets) for r in receivers])
                del refs
            if rep:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[method] = {"seconds": seconds, "gbps_per_engine": nbytes / seconds / 1e9,
                       "gbps_total": engines * nbytes / seconds / 1e9}
    for actor in [sender, *receivers]:
        ray.kill(actor)
    return {"bytes": nbytes, "tensors": len(shapes), "buckets": len(buckets), "methods": out}


# ----------------------------------------------------------------------------------------------- engines
def engine_bench(spec: str, engines: int, reps: int) -> dict:
    from rlhf_ray.cluster.roles import ModelPaths, Roles
    from rlhf_ray.config import load_config
    from rlhf_ray.drivers.ppo import ppo_learner
    from rlhf_ray.models.specs import resolve_model

    cfg = load_config(None, [f"models.policy={spec}", "models.reward.kind=function",
                             "models.reward.function=rlhf_ray.rewards:char_frequency", "models.value_init=policy",
                             f"resources.generation.num_actors={engines}", "resources.generation.num_cpus=0.5",
                             "resources.learner.num_cpus=0.5", "ppo.rollout_batch_size=16",
                             "ppo.mini_batch_size=16", "ppo.total_episodes=16", "generation.max_new_tokens=8",
                             f"weights.bucket_mb={BUCKET_MB}", f"output_dir={tempfile.mkdtemp(prefix='bench_sync_')}",
                             "timeouts.weight_sync_s=900"])
    path = resolve_model(spec, cfg.models.cache_dir, cfg.seed)
    paths = ModelPaths(policy=path, reference=path, reward=None, value=None)
    started = time.perf_counter()
    roles = Roles(cfg, paths, ppo_learner(cfg, paths), roles=("learner", "generation"))
    startup = time.perf_counter() - started
    prompt, response = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    out = {"startup_s": startup}
    try:
        for transport in ("object_store", "collective", "files"):
            roles.transport = transport
            roles.sync_weights()  # warm-up (and the group's formation for the collective)
            runs = []
            for _ in range(reps):
                start = time.perf_counter()
                result = roles.sync_weights()
                runs.append({"wall": time.perf_counter() - start, "publish": result["publish"],
                             "load": result["load"]})
            learner = roles.learner_logprobs(prompt, response)
            gap = max(abs(a - b) for engine in roles.generator_logprobs(prompt, response)
                      for a, b in zip(engine, learner))
            out[transport] = {key: statistics.median(r[key] for r in runs) for key in ("wall", "publish", "load")}
            out[transport]["max_logprob_gap"] = gap
    finally:
        roles.shutdown()
    return out


# ----------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default="1,2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-engines", action="store_true", help="only the transfer part (no vLLM, no DeepSpeed)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    import os

    import ray

    from rlhf_ray.runtime.engines import CPU_ENV
    from rlhf_ray.cluster.machine import describe, machine_info
    from rlhf_ray.models.specs import resolve_model

    os.environ.update(CPU_ENV)
    models = args.models.split(",")
    engine_counts = [int(n) for n in args.engines.split(",")]
    result = {"machine": machine_info(), "memcpy_gbps": memcpy_gbps(), "bucket_mb": BUCKET_MB, "models": {}}
    print(describe(result["machine"]))
    print("memcpy GB/s:", {k: round(v, 2) for k, v in result["memcpy_gbps"].items()})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in models:
            path = resolve_model(MODELS[name], None, 0)
            entry = result["models"][name] = {"spec": MODELS[name], "transfer": {}, "engines": {}}
            for n in engine_counts:
                entry["transfer"][n] = transfer_bench(path, n, args.reps)
                print(f"{name} transfer, {n} receiver(s):", _row(entry["transfer"][n]))
                if not args.skip_engines:
                    entry["engines"][n] = engine_bench(MODELS[name], n, args.reps)
                    print(f"{name} engines, {n}:", {t: round(v["wall"], 3) for t, v in entry["engines"][n].items()
                                                    if isinstance(v, dict)})
    finally:
        ray.shutdown()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_sync.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "weight_sync.md").write_text(markdown(result))
    plot(result, out / "weight_sync.png")
    print(markdown(result))


def _row(transfer: dict) -> dict:
    return {m: f"{v['seconds']:.3f} s {v['gbps_per_engine']:.2f} GB/s" for m, v in transfer["methods"].items()}


def markdown(result: dict) -> str:
    mem = max(result["memcpy_gbps"].values())
    lines = [f"# Weight sync on this machine\n\n{_describe(result)}\n",
             f"memcpy (torch copy_, best of 1 and all threads): **{mem:.2f} GB/s**; buckets of "
             f"{result['bucket_mb']} MiB. GB/s = the model's bytes per engine / seconds of one sync.\n",
             "## Transfer (learner tensors into the receivers' own parameters; no vLLM)\n",
             "| model | MB | receivers | pickled tensors (before) | object_store (now) | collective | best / memcpy |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        for n, t in entry["transfer"].items():
            m = t["methods"]
            best = max(v["gbps_per_engine"] for v in m.values())
            cells = [f"{m[k]['seconds']:.3f} s, {m[k]['gbps_per_engine']:.2f} GB/s"
                     for k in ("pickled", "object_store", "collective")]
            lines.append(f"| {name} | {t['bytes'] / 1e6:.0f} | {n} | " + " | ".join(cells) + f" | {best / mem:.0%} |")
    if any(entry["engines"] for entry in result["models"].values()):
        lines += ["\n## Into real vLLM engines (one `sync_weights()`: publish + transfer + vLLM's reload)\n",
                  "| model | engines | object_store | collective | files | max logprob gap |", "|---|---|---|---|---|---|"]
        for name, entry in result["models"].items():
            size = next(iter(entry["transfer"].values()))["bytes"]
            for n, e in entry["engines"].items():
                cells = [f"{e[k]['wall']:.3f} s ({size / e[k]['wall'] / 1e9:.2f} GB/s; load {e[k]['load']:.3f})"
                         for k in ("object_store", "collective", "files")]
                gap = max(e[k]["max_logprob_gap"] for k in ("object_store", "collective", "files"))
                lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {gap:.1e} |")
    return "\n".join(lines) + "\n"


def _describe(result: dict) -> str:
    from rlhf_ray.cluster.machine import describe

    return describe(result["machine"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = max(result["memcpy_gbps"].values())
    counts = sorted({n for e in result["models"].values() for n in e["transfer"]})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, n in zip(axes[0], counts):
        for method, style in (("pickled", "o--"), ("object_store", "s-"), ("collective", "^-")):
            xs, ys = [], []
            for entry in result["models"].values():
                if n in entry["transfer"]:
                    xs.append(entry["transfer"][n]["bytes"] / 1e6)
                    ys.append(entry["transfer"][n]["methods"][method]["gbps_per_engine"])
            ax.plot(xs, ys, style, label=f"transfer: {method}")
        xs, ys = [], []
        for entry in result["models"].values():
            if n in entry["engines"]:
                size = entry["transfer"][n]["bytes"]
                xs.append(size / 1e6)
                ys.append(size / min(entry["engines"][n][k]["wall"] for k in ("object_store", "collective", "files"))
                          / 1e9)
        if xs:
            ax.plot(xs, ys, "k*-", label="into vLLM, best transport")
        ax.axhline(mem, color="grey", linestyle=":", label=f"memcpy {mem:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("model size (MB, fp32)")
        ax.set_ylabel("GB/s per engine")
        ax.set_title(f"{n} engine(s)")
        ax.legend(fontsize=8)
    fig.suptitle("Weight sync: learner → engines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
