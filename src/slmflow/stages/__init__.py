"""The pipeline's stages: plain functions, typed config in, ArtifactRef out.

Each writes one content-keyed folder through `slmflow.artifacts.run_stage`; Prefect (in `tasks/`)
adds retries, caching and persistence around them.
"""


def release_memory() -> None:
    """Give the memory a finished stage freed back to the system.

    A stage's models and the Trainer sit in reference cycles until the collector runs, and glibc
    keeps freed heap pages in the process: after fine-tuning, the process held ~570 MB more than
    it used, still held while the next stages (and the export's builder subprocess) ran.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        pass
