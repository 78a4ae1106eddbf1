"""Secrets (Hugging Face token, Azure credentials) from the environment or Prefect Secret blocks.

Values are returned to the caller only; nothing here logs them, and configs never hold them.
"""

from __future__ import annotations

import os


def get_secret(env_var: str, block: str | None = None) -> str | None:
    """The secret from `$env_var`, else from the secret store that `$SLMFLOW_SECRET_<env_var>`
    names (keyvault://VAULT/NAME: Azure Key Vault, through the plugged-in `keyvault` scheme),
    else from the Prefect Secret block `block`, else None."""
    value = os.environ.get(env_var)
    if value:
        return value
    field = f"SLMFLOW_SECRET_{env_var}"
    ref = os.environ.get(field)
    if ref:
        from slmflow.inputs import scheme

        return scheme(ref.partition("://")[0], field).secret(ref, field)
    if block is None or not _prefect_api_url():
        return None  # no server configured: don't start one just to look a secret up
    try:
        from prefect.blocks.system import Secret

        return Secret.load(block, _sync=True).get()
    except ValueError:  # no such block
        return None


def _prefect_api_url() -> str | None:
    """The Prefect API this process talks to: the environment, a profile or a settings context."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    return get_current_settings().api.url
