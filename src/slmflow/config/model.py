"""The base model section (`model.*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slmflow.config.base import SMOLLM2_GGUF, PathSpec, _Config


class BaseModelConfig(_Config):
    """The base model to fine-tune."""

    source: Literal["hf", "gguf", "azureml_registry"] = Field(
        "gguf",
        title="Source",
        description="hf: a Hugging Face hub id or a local transformers folder; gguf: a .gguf "
        "file (converted to safetensors once); azureml_registry: a model in an AzureML registry.",
    )
    name_or_path: PathSpec = Field(
        SMOLLM2_GGUF,
        title="Name or path",
        description="Hub id (e.g. microsoft/Phi-3-mini-4k-instruct), local folder, .gguf file, "
        "or an AzureML registry model: azureml://registries/R/models/N/versions/V (or its name "
        "with registry_name and version). 'pkg:MODULE/FILE' names a file inside an installed "
        "Python package.",
        min_length=1,
    )
    revision: str | None = Field(
        None, title="Revision", description="Hub revision (branch, tag or commit) for source=hf."
    )
    registry_name: str | None = Field(
        None, title="AzureML registry", description="Registry name, e.g. azureml-msr."
    )
    version: str | None = Field(
        None, title="AzureML model version", description="Registry model version, e.g. '11'."
    )
    trust_remote_code: bool = Field(
        False,
        title="Trust remote code",
        description="Run Python code shipped with the model repository. Off unless you trust it.",
    )

    @model_validator(mode="after")
    def _registry_fields(self) -> BaseModelConfig:
        uri = self.name_or_path.startswith("azureml:")
        if uri and self.source != "azureml_registry":
            raise ValueError(
                f"model.name_or_path {self.name_or_path!r} is an AzureML reference: set "
                "model.source=azureml_registry"
            )
        if self.source != "azureml_registry":
            return self
        if uri:
            from slmflow.errors import SlmflowError
            from slmflow.uris import parse_registry_model

            try:
                parse_registry_model(self.name_or_path)
            except SlmflowError as exc:  # pydantic needs a ValueError
                raise ValueError(str(exc)) from None
        elif not (self.registry_name and self.version):
            raise ValueError(
                "model.source=azureml_registry needs model.registry_name and model.version "
                "(e.g. registry_name: azureml-msr, version: '11') with the model's name in "
                "model.name_or_path, or model.name_or_path "
                "azureml://registries/R/models/N/versions/V"
            )
        return self
