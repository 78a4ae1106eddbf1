"""Whether a config value can name a file, folder or dataset at all, before anything looks.

Config validation runs this on every path-like key (model.name_or_path, data.train_file,
data.eval_file, output_dir, cache_dir), so that a NUL character, an over-long name, a malformed
`pkg:` reference or an `hf:` name that is a path (`hf:/` would make `datasets` scan the whole file
system) is one line naming the key, not an exception or a hang deep in pathlib, importlib or
datasets.
"""

from __future__ import annotations

import re

# pkg:PACKAGE/FILE names a file inside an installed top-level package. Only top-level: finding a
# subpackage imports its parent, so a mistyped dotted name could run code or fail on import.
PACKAGE_FILE = re.compile(r"^pkg:[A-Za-z_][A-Za-z0-9_]*/[^/]")
# hf:NAME is a Hugging Face hub dataset id (NAME or ORG/NAME), as the hub allows them.
HUB_DATASET = re.compile(r"^hf:[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
NAME_MAX, PATH_MAX = 255, 4096  # bytes, as Linux file systems allow


def path_problem(spec: str) -> str | None:
    """Why `spec` can name no file or folder (with the fix); None where it can."""
    if "\x00" in spec:
        return "contains a NUL character, which no path can hold; fix the path"
    try:
        raw = spec.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "contains characters no file name can hold (a lone surrogate); fix the path"
    if spec.startswith("pkg:") and not PACKAGE_FILE.match(spec):
        return ("is not pkg:PACKAGE/FILE with PACKAGE an installed top-level Python package "
                "(e.g. pkg:slmflow/data/tones.jsonl); fix the reference")
    if spec.startswith("hf:") and not (HUB_DATASET.match(spec) and ".." not in spec):
        return ("is not hf:NAME with NAME a Hugging Face dataset id (NAME or ORG/NAME); name a "
                "hub dataset, or a local file without hf:")
    if len(raw) > PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return (f"is longer than file systems allow (a name over {NAME_MAX} bytes or a path over "
                f"{PATH_MAX}); fix the path")
    return None


def checked_path(spec: str) -> str:
    """`spec`, or a ValueError saying why it can name no file (pydantic's validator form)."""
    problem = path_problem(spec)
    if problem:
        raise ValueError(problem)
    return spec
