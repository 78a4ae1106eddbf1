"""A tiny random-init Phi-3 model with its own byte-level BPE tokenizer, for fast tests.

The model is small (4 layers, hidden 256, vocab 1024; every dim a multiple of 32 so that the
int4 ``MatMulNBits`` block size divides it) and is built deterministically: two builds with the
same seed and corpus give byte-identical files. onnxruntime-genai's model builder exports the
folder to int4 on CPU as is.

`shape="phi3-mini"` builds the same kind of model with Phi-3-mini-4k's real widths (hidden 3072,
32 heads, intermediate 8192, vocab 32064) and few layers: dimension-specific bugs of the builder
or the quantizers show on it before a user's GPU run (`tests/e2e/test_real_dims.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from slmflow.artifacts import build_folder

TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 1024
MAX_POSITIONS = 512
DEFAULT_CORPUS = Path(__file__).parent / "data" / "tones.jsonl"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(model_dir: str | Path) -> bool:
    """Tell whether a folder holds a complete tiny-model build.

    Args:
        model_dir: Folder to inspect.

    Returns:
        True when every file a build writes is present.
    """
    model_dir = Path(model_dir)
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def corpus_texts(corpus_files: list[Path] | None = None) -> list[str]:
    """Read the tokenizer's training texts.

    ``.jsonl`` files are read line by line: a record with ``phrase`` and ``tone`` is rendered with
    :data:`TEMPLATE`, a record with ``text`` is used as is. Any other file is read as plain text,
    one text per non-empty line.

    Args:
        corpus_files: Files to read; defaults to the package's ``data/tones.jsonl``.

    Returns:
        The texts, in file order.

    Raises:
        FileNotFoundError: When a corpus file is missing.
        ValueError: When the corpus holds no text.
    """
    files = [Path(f) for f in corpus_files] if corpus_files else [DEFAULT_CORPUS]
    texts: list[str] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer corpus file not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line)
                continue
            record = json.loads(line)
            if "phrase" in record and "tone" in record:
                texts.append(TEMPLATE.format(phrase=record["phrase"], tone=record["tone"]))
            elif "text" in record:
                texts.append(str(record["text"]))
    if not texts:
        raise ValueError(f"No training text in {[str(f) for f in files]}")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    Byte-level BPE covers every byte, so any text (``"\\n"`` included) encodes with no unknown
    token and ``decode(encode(x)) == x``. ``<|endoftext|>`` is the eos (also bos and unk) token;
    ``<|pad|>`` is a separate pad token so that collators which mask pad labels do not also mask
    the eos the model must learn to emit.

    Args:
        texts: Training texts.
        vocab_size: Upper bound on the vocabulary (a small corpus may give fewer tokens).

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


SHAPES = {
    "tiny": {
        "vocab_size": VOCAB_SIZE, "hidden_size": 256,
        # not 1024 = VOCAB_SIZE: onnxruntime-genai 0.18's builder mis-builds a model whose
        # intermediate size equals its vocabulary size (its ONNX logits then disagree with
        # PyTorch's, correlation ~0.45 even in fp32; measured when the recipe search was built)
        "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": MAX_POSITIONS,
    },
    "phi3-mini": {  # microsoft/Phi-3-mini-4k-instruct's widths (the tokenizer stays the tiny one)
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
}


def _write_model(out_dir: Path, tokenizer, seed: int, shape: str = "tiny",
                 layers: int | None = None) -> None:
    """Build the random-init Phi-3 and save it with its tokenizer into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    config = Phi3Config(
        **dims,
        # The builder picks the LongRoPE variant unless these two are equal.
        original_max_position_embeddings=dims["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)


def build_tiny_phi3(
    out_dir: str | Path, seed: int = 0, corpus_files: list[Path] | None = None,
    shape: str = "tiny", layers: int | None = None,
) -> Path:
    """Build a tiny random-init Phi-3 model and tokenizer folder.

    The folder is built in a temporary directory next to ``out_dir`` and renamed into place, so
    ``out_dir`` is either absent or complete. An existing complete ``out_dir`` is returned as is.

    Args:
        out_dir: Destination folder.
        seed: Seed for the model's random initialisation.
        corpus_files: Tokenizer training corpus (see :func:`corpus_texts`); defaults to the
            package's ``data/tones.jsonl``.
        shape: "tiny", or "phi3-mini" for Phi-3-mini's real widths.
        layers: Decoder layers instead of the shape's.

    Returns:
        The path of the model folder (``config.json``, ``model.safetensors``,
        ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``).

    Raises:
        FileExistsError: When ``out_dir`` exists, is not empty and is not a complete build.
    """
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        _write_model(tmp, train_tokenizer(corpus_texts(corpus_files)), seed, shape, layers)

    return build_folder(out_dir, write, is_complete)
