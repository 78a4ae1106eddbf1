"""The pipeline's stages: plain functions, typed config in, ArtifactRef out.

Each writes one content-keyed folder through `slmflow.artifacts.run_stage`; Prefect (in `tasks/`)
adds retries, caching and persistence around them.
"""
