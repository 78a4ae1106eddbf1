"""slmflow: fine-tune, merge, export int4 ONNX and evaluate small language models with Prefect."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__"]

if TYPE_CHECKING:
    from slmflow.classifier import Classifier, Prediction


def __getattr__(name: str) -> Any:
    """`from slmflow import Classifier` imports it on first use: `import slmflow` stays light."""
    if name in ("Classifier", "Prediction"):
        from slmflow import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'slmflow' has no attribute {name!r}")
