"""Process utilities below every other package: devices and threads, memory, torch extension builds, stop signals
(``signals``: a run's clean stop) and waiting on Ray calls with timeouts that name the role (``waiting``).

Role actors (``rlhf_ray.actors``), reward backends, drivers and benchmarks all use them; they import nothing of the
project's own.
"""
