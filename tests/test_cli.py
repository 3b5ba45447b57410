"""The command table (rlhf_ray.cli.COMMANDS) is the top level's rule: every module at the top of rlhf_ray is a thin
``python -m`` entry point listed there, and every listed command has a ``main`` that answers --help."""
from __future__ import annotations

import ast
import importlib

import pytest

from rlhf_ray.cli import COMMANDS, table
from tests.conftest import ROOT


def test_the_top_level_holds_only_thin_entry_points_and_the_table_names_each():
    top = {f"rlhf_ray.{p.stem}" for p in (ROOT / "rlhf_ray").glob("*.py") if p.stem != "__init__"}
    assert top <= set(COMMANDS), top - set(COMMANDS)
    assert {name for name in COMMANDS if name.count(".") == 1} - {"rlhf_ray.config"} == top  # config: a package
    for name in top:
        body = ast.parse((ROOT / "rlhf_ray" / f"{name.split('.')[1]}.py").read_text()).body
        statements = [type(node).__name__ for node in body[1:]]  # after the docstring: imports, main, __main__ guard
        assert len(statements) <= 5 and set(statements) <= {"ImportFrom", "Import", "FunctionDef", "If"}, name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_main_that_answers_help(command, capsys):
    implementation, what = COMMANDS[command]
    module = importlib.import_module(command if importlib.util.find_spec(command).submodule_search_locations is None
                                     else implementation)
    try:
        code = module.main(["--help"])
    except SystemExit as ended:  # argparse's --help
        code = ended.code
    assert code in (0, None) and "usage" in capsys.readouterr().out.lower()
    assert what and command in table()
