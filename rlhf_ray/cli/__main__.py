from rlhf_ray.cli import table

print(table())
