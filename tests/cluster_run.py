"""PPO on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster), for tests/test_multinode.py.

Nodes (1 logical CPU each unless said): ``solo`` (3 CPUs, pool=solo), ``gen-a`` and ``gen-b`` (pool=gen), ``learn``
(pool=learn), ``score`` (pool=score). Two runs of the tiny default through ``python -m rlhf_ray.train`` as a user
starts them (``ray.address`` = the cluster):

- ``three_nodes``: generation on pool=gen, the learner on pool=learn, reward and reference on pool=score, weights
  broadcast across nodes (``weights.transport=collective``). After
  its step 2 the node that holds the engine is removed (the spare gen node takes over); a few steps later the
  other gen node is removed too (no room is left: the run must stop, saying so);
- ``one_node``, at the same time on the solo node (it used to start after ``three_nodes``): every role labelled
  pool=solo (weights through the object store), to its end after ONE_NODE_STEPS steps, more than ``three_nodes``
  records (the steps it recorded are compared). Both runs keep a constant LR (no warmup, no decay), so that a step's
  update does not depend on how many steps the run has in all.

Prints ``RESULT{json}``: each run's exit code, console tail, metrics rows, placement.json before and after.
Usage: python tests/cluster_run.py OUT_DIR TINY_CACHE
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
ONE_NODE_STEPS = 16  # three_nodes records 2 steps, 3 more after the first node goes, then stops within a step or two
POOLS = {"solo": 3, "gen-a": 1, "gen-b": 1, "learn": 1, "score": 1}


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def placement(out: Path) -> dict:
    path = out / "placement.json"
    return json.loads(path.read_text())["actors"] if path.is_file() else {}


def start(address: str, out: Path, cache: str, labels: dict[str, str], *extra: str,
          steps: int = STEPS) -> subprocess.Popen:
    overrides = [f"resources.{role}.labels={{pool: {pool}}}" for role, pool in labels.items()]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.train", f"ray.address={address}", f"output_dir={out}",
         f"models.cache_dir={cache}", "logging.progress_bar=false", "logging.report=false",
         f"ppo.total_episodes={16 * steps}", "checkpoint.every_steps=0", "timeouts.placement_s=10",
         "optimizer.schedule=constant", "optimizer.warmup_ratio=0", *overrides, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(run: subprocess.Popen, out: Path, steps: int, timeout_s: float = 300) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and run.poll() is None:
        if len(rows(out)) >= steps:
            return True
        time.sleep(0.05)
    return False


def finish(run: subprocess.Popen, out: Path, before: dict) -> dict:
    console = run.communicate(timeout=600)[0]
    return {"code": run.returncode, "console": console[-6000:], "rows": rows(out), "placement_before": before,
            "placement_after": placement(out)}


def main(out_root: str, cache: str) -> None:
    from ray.cluster_utils import Cluster

    root = Path(out_root)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    nodes = {name: cluster.add_node(num_cpus=cpus, labels={"pool": name.split("-")[0]})
             for name, cpus in POOLS.items()}
    cluster.wait_for_nodes()
    ids = {node.node_id: name for name, node in nodes.items()}
    result = {"nodes": ids}
    try:
        one_out = root / "one_node"  # on the solo node, beside the three-node run
        one_run = start(cluster.address, one_out, cache,
                        {r: "solo" for r in ("generation", "learner", "reward", "reference")}, steps=ONE_NODE_STEPS)
        out = root / "three_nodes"
        run = start(cluster.address, out, cache, {"generation": "gen", "learner": "learn", "reward": "score",
                                                  "reference": "score"}, "weights.transport=collective")
        removed = []
        if wait_for(run, out, 2):
            before = placement(out)
            engine_node = ids[before["generation-0"]["node"]]
            cluster.remove_node(nodes[engine_node])
            removed.append(engine_node)
            if wait_for(run, out, len(rows(out)) + 3):
                spare = "gen-b" if engine_node == "gen-a" else "gen-a"
                cluster.remove_node(nodes[spare])
                removed.append(spare)
        else:
            before = placement(out)
        result["three_nodes"] = finish(run, out, before)
        result["removed"] = removed
        result["one_node"] = finish(one_run, one_out, placement(one_out))
    finally:
        cluster.shutdown()
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
