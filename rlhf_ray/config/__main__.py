import sys

from rlhf_ray.config.cli import main

sys.exit(main())
