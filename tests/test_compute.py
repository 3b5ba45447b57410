"""The compute plan: threads per phase, CPU sets when rollout and learning overlap (rlhf_ray.cluster.compute)."""
from __future__ import annotations

from rlhf_ray.cluster.compute import ActorSite, plan_compute

CPUS = (0, 1, 2, 3)


def sites(*roles, node="n1", cpus=CPUS):
    counts: dict[str, int] = {}
    out = []
    for role in roles:
        out.append(ActorSite(role, counts.get(role, 0), node, cpus))
        counts[role] = counts.get(role, 0) + 1
    return out


NO_OVERRIDE = {"generation": None, "reward": None, "reference": None, "learner": None}


def test_phases_one_after_another_share_the_node_among_the_roles_of_each_phase():
    plans = plan_compute(sites("learner", "generation", "reward", "reference"), False, NO_OVERRIDE)
    assert plans[("generation", 0)].threads == {"generate": 4}            # alone while generating
    assert plans[("learner", 0)].threads == {"score": 1, "learn": 4}     # 3 roles score together; learns alone
    assert plans[("reward", 0)].threads == {"score": 1} == plans[("reference", 0)].threads
    assert all(p.cpus is None for p in plans.values())                   # nothing overlaps: no CPU sets


def test_a_reward_without_torch_leaves_the_scoring_cores_to_the_others():
    plans = plan_compute(sites("learner", "generation", "reward"), False, NO_OVERRIDE, light_roles=("reward",))
    assert plans[("learner", 0)].threads == {"score": 4, "learn": 4}     # LoRA: the learner scores alone
    assert plans[("reward", 0)].threads == {"score": 1}


def test_two_learner_ranks_and_two_engines_split_their_phases():
    plans = plan_compute(sites("learner", "learner", "generation", "generation", "reward", "reference"), False,
                         NO_OVERRIDE)
    assert plans[("learner", 1)].threads["learn"] == 2
    assert plans[("generation", 0)].threads["generate"] == 2
    assert plans[("learner", 0)].threads["score"] == 1                    # 4 actors score on 4 CPUs


def test_overlapped_rollout_and_learner_get_disjoint_cpus():
    plans = plan_compute(sites("learner", "generation", "reward", "reference"), True, NO_OVERRIDE)
    learner, generation = plans[("learner", 0)], plans[("generation", 0)]
    assert set(learner.cpus).isdisjoint(generation.cpus) and set(learner.cpus) | set(generation.cpus) == set(CPUS)
    assert generation.threads == {"generate": 2} and plans[("reward", 0)].threads == {"score": 1}
    assert learner.threads == {"score": 2, "learn": 2}                    # its values pass is on its own side
    three = plan_compute(sites("learner", "generation", "reward", "reference"), True, NO_OVERRIDE, rollout_cores=3)
    assert three[("generation", 0)].cpus == [0, 1, 2] and three[("learner", 0)].cpus == [3]


def test_two_cpus_overlapped_is_one_each_and_one_cpu_cannot_be_split_below_one():
    plans = plan_compute(sites("learner", "generation", "reward", "reference", cpus=(0, 1)), True, NO_OVERRIDE)
    assert plans[("generation", 0)].cpus == [0] and plans[("learner", 0)].cpus == [1]
    assert plans[("learner", 0)].threads["learn"] == 1
    one = plan_compute(sites("learner", "generation", cpus=(0,)), True, NO_OVERRIDE, rollout_cores=4)
    assert one[("generation", 0)].threads == {"generate": 1} and one[("learner", 0)].threads["learn"] == 1


def test_roles_on_different_nodes_each_use_their_own_node():
    both = sites("generation", "reward", "reference", node="a") + sites("learner", node="b", cpus=(0, 1, 2, 3, 4, 5, 6, 7))
    plans = plan_compute(both, True, NO_OVERRIDE)
    assert plans[("learner", 0)].threads == {"score": 8, "learn": 8} and plans[("learner", 0)].cpus is None
    assert plans[("generation", 0)].threads == {"generate": 4}


def test_a_role_override_fixes_its_threads_and_nice_is_passed_on():
    plans = plan_compute(sites("learner", "generation"), False, {**NO_OVERRIDE, "learner": 3}, nice=5)
    assert plans[("learner", 0)].threads == {"score": 3, "learn": 3}
    assert plans[("generation", 0)].nice == 5


def test_in_a_solo_phase_each_role_has_the_node_to_its_ranks_alone():
    """DPO: the reference's log-probs, then the policy's evaluation pass — never both at once."""
    plans = plan_compute(sites("learner", "learner", "reference", cpus=(0, 1)), False, NO_OVERRIDE,
                         solo_phases=("score",))
    assert plans[("reference", 0)].threads == {"score": 2}
    assert plans[("learner", 0)].threads == {"score": 1, "learn": 1}      # two ranks share the node
    shared = plan_compute(sites("learner", "reference", cpus=(0, 1)), False, NO_OVERRIDE)
    assert shared[("reference", 0)].threads == {"score": 1}
