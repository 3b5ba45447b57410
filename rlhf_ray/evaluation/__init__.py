"""Policy evaluation's parts that need no cluster: the held-out prompts (``prompts``) and the comparison of judged
answers, written as a report (``comparison``). The command that runs policies and a judge: rlhf_ray.cli.evaluate."""
