"""rlhf-ray: distributed RLHF (PPO) for language models on Ray."""
__version__ = "0.1.0"


def _source_tree_actors() -> None:
    """The role classes live in the repository's top-level ``actors/`` (the project's layout) and are imported as
    ``rlhf_ray.actors``. An installed wheel holds them there (pyproject maps the directory); a source tree — a checkout
    on PYTHONPATH, the directory that ``ray job submit --working-dir .`` uploads — has them beside this package, and
    is told here where they are. Nothing named ``actors`` is ever importable on its own."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    beside = here.parent / "actors"
    if "rlhf_ray.actors" in sys.modules or (here / "actors").is_dir() or not (beside / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("rlhf_ray.actors", beside / "__init__.py",
                                                  submodule_search_locations=[str(beside)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rlhf_ray.actors"] = module
    spec.loader.exec_module(module)


_source_tree_actors()
