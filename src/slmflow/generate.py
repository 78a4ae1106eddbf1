"""Answers and label scores from a model: PyTorch for transformers folders, onnxruntime-genai for
exported ones.

Greedy answers: prompts of the same token length are generated together (up to BATCH_SIZE, never
padded), which gives each row the answer it gets alone. Label scores: each label's tokens
teacher-forced after the prompt, the sum of their log-probabilities (`slmflow.fidelity`
normalizes them over the label set). Constrained answers (exported models): onnxruntime-genai's
guidance (llguidance) keeps every token inside a regular expression over the labels, then EOS.
The evaluation stage, the export's smoke test and `slmflow.classifier` use it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmflow.artifacts import ArtifactRef

# Prompts of the same token length are generated together: no padding, so each row's answer is
# the one it gets alone (checked row by row on the default's base, merged and int4 models). On
# the default's 144 rows, 2 cores: PyTorch 7.1 -> 18.3 examples/s, onnxruntime-genai 17.7 -> 26.3
# (bench/bench_inference.py); 16 was the fastest of 4, 8, 16, 32.
BATCH_SIZE = 16

Generator = Callable[[list[list[int]], int], list[list[int]]]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for n, t in enumerate(tokens):
        if t in eos:
            return tokens[:n]
    return tokens


def length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Row indices grouped by exact length (so no batch needs padding), at most `size` a batch."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [rows[i:i + size] for _, rows in sorted(by_length.items()) for i in range(0, len(rows), size)]


# (prompts, each label's tokens) -> per prompt, each label's log-probability after it
LabelScorer = Callable[[list[list[int]], list[list[int]]], list[list[float]]]
SCORE_ROWS = 16  # rows a forward pass when PyTorch scores labels (4 labels: 64 sequences)


@dataclass(frozen=True)
class Backend:
    """A loaded model: greedy answers, label scores, its tokenizer (HF: the same prompt ids for
    every backend) and its folder."""

    generate: Generator  # (equal-length prompts, max new tokens) -> new tokens of each
    score_labels: LabelScorer
    tokenizer: Any
    folder: Path
    engine: Any = None  # onnxruntime-genai's Model, for its own tokenizer
    module: Any = None  # the PyTorch model (slmflow.sensitivity changes its weights in place)
    # (equal-length prompts, max new tokens, regex) -> new tokens inside the regex (onnx only)
    guided: Callable[[list[list[int]], int, str], list[list[int]]] | None = None
    # (name) -> None: the loaded adapter file every later generator runs with (separate form)
    use_adapter: Callable[[str], None] | None = None


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def torch_backend(folder: Path, trust_remote_code: bool = False) -> Backend:
    """A transformers model (fp32, CPU or CUDA): batched greedy answers, teacher-forced labels."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    return _module_backend(model, folder, folder, device)


def trained_backend(folder: Path, adapter: Path, quantization: dict[str, Any],
                    trust_remote_code: bool = False) -> Backend:
    """A QLoRA model as trained: the 4-bit base (bitsandbytes) with its adapter, unmerged."""
    import torch

    from slmflow.qlora import load_trained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_trained(folder, adapter, quantization, device, trust_remote_code)
    return _module_backend(model, folder, adapter, device)


def _module_backend(model: Any, tokenizer_folder: Path, folder: Path, device: str) -> Backend:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def generate(batch: list[list[int]], max_new: int) -> list[list[int]]:
        ids = torch.tensor(batch, device=device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return [_until_eos(row[ids.shape[1]:].tolist(), {eos}) for row in out]

    def score_labels(prompts: list[list[int]], labels: list[list[int]]) -> list[list[float]]:
        scores: list[list[float]] = []
        for start in range(0, len(prompts), SCORE_ROWS):  # a forward pass per chunk of rows
            chunk = prompts[start:start + SCORE_ROWS]
            seqs = [(p, lab) for p in chunk for lab in labels]
            width = max(len(p) + len(lab) for p, lab in seqs)
            ids = [p + lab + [pad] * (width - len(p) - len(lab)) for p, lab in seqs]
            mask = [[1] * (len(p) + len(lab)) + [0] * (width - len(p) - len(lab)) for p, lab in seqs]
            with torch.no_grad():  # padding on the right: the scored positions never see it
                logits = model(input_ids=torch.tensor(ids, device=device),
                               attention_mask=torch.tensor(mask, device=device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            flat = [sum(float(logp[k, len(p) - 1 + i, t]) for i, t in enumerate(lab))
                    for k, (p, lab) in enumerate(seqs)]
            scores += [flat[i:i + len(labels)] for i in range(0, len(flat), len(labels))]
        return scores

    return Backend(generate, score_labels, tokenizer, folder, module=model)


def onnx_backend(folder: Path, adapter: Path | dict[str, Path] | None = None) -> Backend:
    """An exported model on onnxruntime-genai: batched greedy answers, teacher-forced labels (the
    prompt's cache kept, each label appended and rewound). `adapter`: an .onnx_adapter file for
    this base (export.adapters=separate), active in every generator; or {name: file}, all loaded
    once, the first active until `backend.use_adapter(name)`."""
    import numpy as np
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    model = og.Model(str(folder))
    generator, use_adapter = _generators(model, adapter)
    eos_cfg = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])

    def generate(batch: list[list[int]], max_new: int, regex: str | None = None) -> list[list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(batch[0]) + max_new, batch_size=len(batch)
        )
        if regex is not None:  # llguidance masks every token the regex cannot continue with
            params.set_guidance("regex", regex)
        gen = generator(params)
        gen.append_tokens(np.asarray(batch, dtype=np.int32))
        new: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(max_new):
            if gen.is_done() or all(done):
                break
            gen.generate_next_token()
            for i, token in enumerate(gen.get_next_tokens().tolist()):
                if done[i] or token in eos:
                    done[i] = True
                else:
                    new[i].append(int(token))
        return new

    def score_one(prompt: list[int], labels: list[list[int]]) -> list[float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + max(len(lab) for lab in labels) + 1,
                                  batch_size=1)
        gen = generator(params)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        first = _log_softmax(gen.get_output("logits")[0, -1])
        scores = []
        for lab in labels:
            score = float(first[lab[0]])
            if len(lab) > 1:
                gen.append_tokens(np.asarray([lab[:-1]], dtype=np.int32))
                rest = _log_softmax(gen.get_output("logits")[0])
                score += sum(float(rest[i, t]) for i, t in enumerate(lab[1:]))
                gen.rewind_to(len(prompt))
            scores.append(score)
        return scores

    def score_labels(prompts: list[list[int]], labels: list[list[int]]) -> list[list[float]]:
        return [score_one(p, labels) for p in prompts]

    return Backend(generate, score_labels, AutoTokenizer.from_pretrained(folder), folder, model,
                   guided=_guided(generate), use_adapter=use_adapter)


def _generators(model: Any, adapter: Path | dict[str, Path] | None
                ) -> tuple[Callable[[Any], Any], Callable[[str], None] | None]:
    """(`og.Generator(model, params)` with the active adapter set, the function that picks it).
    Adapter files load once into one `og.Adapters`; the functions hold it, so it lives as long
    as the backend."""
    import onnxruntime_genai as og

    if adapter is None:
        return (lambda params: og.Generator(model, params)), None
    files = adapter if isinstance(adapter, dict) else {"active": adapter}
    adapters = og.Adapters(model)
    for name, file in files.items():
        adapters.load(str(file), name)
    active = [next(iter(files))]

    def generator(params: Any) -> Any:
        gen = og.Generator(model, params)
        gen.set_active_adapter(adapters, active[0])
        return gen

    def use_adapter(name: str) -> None:
        if name not in files:
            raise KeyError(f"no adapter {name!r}; loaded: {', '.join(files)}")
        active[0] = name

    return generator, use_adapter


def _guided(generate: Callable[..., list[list[int]]]) -> Callable[[list[list[int]], int, str], list[list[int]]]:
    """Batched generation inside a regex. onnxruntime-genai 0.18 fails a batch whose rows end
    the regex at different steps ("compute_mask() called after stop": it asks a finished row's
    grammar for one more token); such a batch is generated again a row at a time, which gives
    the same answers (no padding either way). Rows that end together (a trained model's, whose
    labels are whole tokens) stay batched."""

    def guided(batch: list[list[int]], max_new: int, regex: str) -> list[list[int]]:
        try:
            return generate(batch, max_new, regex)
        except RuntimeError as exc:
            if len(batch) == 1 or "after stop" not in str(exc):
                raise
        return [generate([row], max_new, regex)[0] for row in batch]

    return guided


def load_backend(model: ArtifactRef, trust_remote_code: bool = False,
                 adapter: ArtifactRef | None = None, base: ArtifactRef | None = None,
                 quantization: dict[str, Any] | None = None) -> Backend:
    """The backend of a base/merged model folder (PyTorch), an exported one, an exported base
    with a fine-tune's adapter file (onnxruntime-genai), or a QLoRA adapter on its 4-bit `base`
    (the model as trained)."""
    from slmflow.folders import model_dir

    if model.kind == "onnx_model":
        return onnx_backend(model.path)
    if model.kind == "onnx_base":
        from slmflow.onnx_adapters import ADAPTER_FILE

        return onnx_backend(model.path, adapter.path / ADAPTER_FILE if adapter else None)
    if model.kind == "adapter":
        if base is None or quantization is None:
            raise ValueError("an adapter is evaluated on its base with the 4-bit settings it was "
                             "trained with (base=, quantization=)")
        return trained_backend(model_dir(base), model.path, quantization, trust_remote_code)
    return torch_backend(model_dir(model), trust_remote_code)


def generate_answers(
    generate: Generator, prompts: list[list[int]], max_new: int, batch_size: int = BATCH_SIZE
) -> tuple[list[list[int]], list[float]]:
    """The new tokens of every prompt (in order) and the seconds each one waited for its batch."""
    new: list[list[int]] = [[] for _ in prompts]
    waited = [0.0] * len(prompts)
    for batch in length_batches([len(p) for p in prompts], batch_size):
        start = time.perf_counter()
        out = generate([prompts[i] for i in batch], max_new)
        seconds = time.perf_counter() - start
        for i, tokens in zip(batch, out):
            new[i], waited[i] = tokens, seconds
    return new, waited


def label_regex(labels: list[str]) -> str:
    """The guidance expression that admits exactly one of the labels, e.g. `(Sad|Joy)`."""
    meta = set("\\.^$|?*+()[]{}-&~#")
    return "(" + "|".join("".join("\\" + c if c in meta else c for c in lab) for lab in labels) + ")"


def label_probabilities(backend, prompts: list[list[int]], labels: list[str]) -> list[dict[str, float]]:
    """Each row's distribution over the label set at the answer position (`slmflow.fidelity`)."""
    from slmflow.fidelity import normalized

    label_ids = [backend.tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    return [normalized(dict(zip(labels, scores)))
            for scores in backend.score_labels(prompts, label_ids)]
