"""slmflow: fine-tune, merge, export int4 ONNX and evaluate small language models with Prefect."""

__version__ = "0.1.0"
