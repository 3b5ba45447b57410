"""Which packages install: everything under rlhf_ray/, plus the repository's top-level actors/ as rlhf_ray.actors (the
project's layout keeps the role classes at the top; nothing named ``actors`` lands in site-packages). A source tree
maps them the same way at import (rlhf_ray/__init__.py). The rest of the metadata is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["rlhf_ray", "rlhf_ray.*"]), "rlhf_ray.actors"],
      package_dir={"rlhf_ray.actors": "actors"},
      package_data={"rlhf_ray.rewards": ["templates/*.jinja"]})  # the LLM judge's shipped judging prompts
