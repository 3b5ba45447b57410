"""Several ``python -m rlhf_ray.rm`` commands in one process, as a script that calls the CLI's main() for each would:
one Python start and one cluster connection instead of one per command (tests/test_reward_swap.py). Prints one JSON
line: each command's exit code, stdout and stderr."""
import contextlib
import io
import json
import sys

from rlhf_ray.cli.rm import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # the CLI's one-line errors
            code = stop.code if isinstance(stop.code, int) else 1
            if not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print("RESULTS" + json.dumps(results))
