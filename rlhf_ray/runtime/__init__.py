"""Process utilities below every other package: devices and threads, memory, torch extension builds.

Role actors (``rlhf_ray.actors``), reward backends, drivers and benchmarks all use them; they import nothing of the
project's own.
"""
