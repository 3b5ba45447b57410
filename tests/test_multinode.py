"""Roles across nodes of a simulated Ray cluster (tests/cluster_run.py): each role lands on the nodes its labels
name, weights cross nodes, the metrics equal the same run's on one node (same seed), a node lost mid-run has its
roles restarted where there is room with every step once, and with no room left the run stops naming the node and
the roles it held."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
COMPARED = ("reward/mean", "score/mean", "kl/mean", "loss/policy", "loss/value", "response/tokens", "optim/grad_norm")


@pytest.fixture(scope="module")
def cluster_runs(tiny_cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cluster")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_run.py"), str(out), str(tiny_cache)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(lines[0][len("RESULT"):])
    result["out"] = out
    return result


def nodes_of(run: dict, names: dict, when: str) -> dict[str, str]:
    return {actor: names[site["node"]] for actor, site in run[f"placement_{when}"].items()}


def test_each_role_runs_where_its_labels_say(cluster_runs):
    names = cluster_runs["nodes"]
    assert set(nodes_of(cluster_runs["one_node"], names, "before").values()) == {"solo"}
    three = nodes_of(cluster_runs["three_nodes"], names, "before")
    assert three["generation-0"] in ("gen-a", "gen-b") and three["learner-0"] == "learn"
    assert three["reward-0"] == three["reference-0"] == "score"


def test_metrics_across_nodes_and_a_lost_node_equal_the_one_node_run(cluster_runs):
    one, three = cluster_runs["one_node"], cluster_runs["three_nodes"]
    rows = three["rows"]
    # the one-node run (beside it) went to its end, over more steps than the three-node run recorded
    assert one["code"] == 0 and [r["step"] for r in one["rows"]] == list(range(1, 17)), one["console"]
    assert 4 <= len(rows) < 16 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # every step once
    assert rows[-1]["recovery/generation_restarts"] == 1.0  # the engine's node went, the spare took over
    # The learner computes with 3 threads on the solo node and 1 on its own node: its gradients' reductions split
    # differently, so the runs agree to float rounding (~1e-6 relative in a step's losses, growing slowly), not bit
    # for bit. Weights that did not cross nodes would differ in the first digits.
    for a, b in zip(one["rows"], rows):  # weights crossed nodes by the collective; the replacement got them too
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert max(r["kl/sampler_vs_learner"] for r in rows) < 1e-4


def test_a_lost_node_moves_its_roles_and_no_room_stops_the_run_naming_them(cluster_runs):
    names, three = cluster_runs["nodes"], cluster_runs["three_nodes"]
    first, spare = cluster_runs["removed"]
    assert nodes_of(three, names, "before")["generation-0"] == first
    assert nodes_of(three, names, "after")["generation-0"] == spare
    console = three["console"]
    assert three["code"] == 1, console
    errors = [line for line in console.splitlines() if " error: " in line]
    assert len(errors) == 1 and "left the cluster with generation-0" in errors[0], console
    assert "no room" in errors[0] and "(pool=gen)" in errors[0]
    assert "Traceback" not in console
