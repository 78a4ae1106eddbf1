"""Olive's `systems` and the keys that name one (`host`, `target`, `workflow_host`), and the
execution providers they carry → slmflow's `export.execution_provider`.

A LocalSystem is this machine. An AzureML system translates (its settings are noted), but a config
that runs on one (as host or target) stops before any work: slmflow runs on AzureML through its
own `azureml` Prefect work pool, not through Olive systems (`check_runnable`).
"""

from __future__ import annotations

from typing import Any

from slmflow.errors import ConfigError
from slmflow.olive.core import Note, Special, Table, Translator, show

SYSTEM_TYPES = ("LocalSystem", "AzureML", "Docker", "PythonEnvironment", "IsolatedORT")
EXECUTION_PROVIDERS = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu",
                       "DmlExecutionProvider": "dml"}
OTHER_PROVIDERS = ("TensorrtExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider",
                   "ROCMExecutionProvider", "MIGraphXExecutionProvider", "WebGpuExecutionProvider",
                   "JsExecutionProvider", "NvTensorRTRTXExecutionProvider", "VitisAIExecutionProvider",
                   "CoreMLExecutionProvider")
ACCELERATOR_KEYS = ["device", "execution_providers", "memory"]
AZUREML_POOL = ("slmflow runs on AzureML through its azureml Prefect work pool (deployment "
                "slmflow-pipeline/azureml, see infra/azureml/README.md), not through Olive systems")


def handle_systems(t: Translator, value: Any, path: str, node: dict) -> None:
    value = t.mapping(value, path, "a mapping of named systems")
    for name, system in value.items():
        read_system(t, str(name), system, f"{path}.{name}")


def read_system(t: Translator, name: str, system: Any, path: str) -> dict[str, Any]:
    if not isinstance(system, dict) or "type" not in system:
        raise t.error(path, "a system needs a type (LocalSystem or AzureML)")
    t.system = t.systems[name] = {"name": name, "type": system["type"], "eps": [], "path": path}
    t.walk(system, SYSTEM, path)
    return t.system


def handle_system_type(t: Translator, value: Any, path: str, node: dict) -> None:
    if value == "LocalSystem":
        t.note(path, value, "noted: this machine (slmflow runs here)")
    elif value == "AzureML":
        t.note(path, value, f"noted: an AzureML system; {AZUREML_POOL}: a run stops where "
                            "engine.host/target or a pass's host names this system")
    elif value in SYSTEM_TYPES:
        raise t.error(path, f"not supported: {value} systems; slmflow runs in its own environment "
                            "(LocalSystem), or on AzureML through its azureml work pool")
    else:
        raise t.unknown(path, value if isinstance(value, str) else show(value),
                        list(SYSTEM_TYPES), "system type")


def handle_accelerators(t: Translator, value: Any, path: str, node: dict) -> None:
    if not isinstance(value, list):
        raise t.error(path, f"expected a list, got {show(value)}")
    for i, accelerator in enumerate(value):
        if isinstance(accelerator, str):  # the seed's form: a device name
            continue
        accelerator = t.mapping(accelerator, f"{path}[{i}]", "a device name or a mapping "
                                "(device, execution_providers)")
        for key in accelerator:
            if key not in ACCELERATOR_KEYS:
                raise t.unknown(f"{path}[{i}].{key}", key, ACCELERATOR_KEYS[:2])
        t.system["eps"] += provider_list(t, accelerator.get("execution_providers"),
                                         f"{path}[{i}].execution_providers")
    if t.system["type"] == "AzureML":
        t.note(path, value, "noted: a setting of the AzureML system, which slmflow does not use "
                            "(it runs on AzureML through its azureml work pool)")
    else:
        t.note(path, value, "noted: its execution_providers apply where engine.target names this "
                            "system")


def handle_aml_setting(t: Translator, value: Any, path: str, node: dict) -> None:
    if t.system.get("type") != "AzureML":
        raise t.error(path, "only AzureML systems take this key")
    t.note(path, value, "noted: a setting of the AzureML system, which slmflow does not use (it "
                        "runs on AzureML through its azureml work pool)")


def handle_system_ref(t: Translator, value: Any, path: str, node: dict) -> None:
    if value is None:
        t.note(path, value, "noted: null: this machine")
        return
    if isinstance(value, dict):
        system = read_system(t, f"({path})", value, path)
    elif isinstance(value, str) and value in t.systems:
        system = t.systems[value]
    else:
        raise t.unknown(path, value if isinstance(value, str) else show(value), list(t.systems),
                        "system")
    if system["type"] == "AzureML":
        t.note(path, value, f"the AzureML system {system['name']!r}: not run (the run stops "
                            "here; see the message)",
               blocker=f"{path}: AzureML system {system['name']!r}")
    elif path.endswith("target") and system["eps"]:
        eps_path = f"{system['path']}.accelerators[].execution_providers (named by {path})"
        t.note(path, value, f"this machine; its execution_providers: "
                            f"{providers(t, system['eps'], eps_path)}")
    else:
        t.note(path, value, "noted: this machine (LocalSystem)")


def check_runnable(notes: list[Note], source: str = "config") -> None:
    """Stop before any work when the config asks to run on an AzureML system (host or target)."""
    asked = [n.blocker for n in notes if n.blocker]
    if asked:
        keys = " and ".join(dict.fromkeys(n.olive_key for n in notes if n.blocker))
        raise ConfigError(
            f"{source}: this Olive config asks to run on AzureML ({'; '.join(asked)}), so nothing "
            f"was run: {AZUREML_POOL}; to run this config here, remove {keys} or name a "
            "LocalSystem there"
        )


def provider_list(t: Translator, value: Any, path: str) -> list[str]:
    """Execution providers as a list of names (Olive takes one name or a list)."""
    eps = [] if value in (None, "") else [value] if isinstance(value, str) else value
    if not (isinstance(eps, list) and all(isinstance(ep, str) for ep in eps)):
        raise t.error(path, f"expected execution provider names, e.g. [\"CPUExecutionProvider\"], "
                            f"got {show(value)}")
    return eps


def handle_execution_providers(t: Translator, value: Any, path: str, node: dict) -> None:
    eps = provider_list(t, value, path)
    if not eps:
        t.note(path, value, "noted: empty: slmflow's default export.execution_provider")
    else:
        t.note(path, value, providers(t, eps, path))


def providers(t: Translator, eps: list[str], path: str) -> str:
    """export.execution_provider from one provider (CUDA also sets finetune.device auto)."""
    if len(set(eps)) > 1:
        raise t.error(path, f"not supported: {len(set(eps))} execution providers; slmflow exports "
                            "for one (run once per provider)")
    ep = eps[0]
    if ep not in EXECUTION_PROVIDERS:
        if ep in OTHER_PROVIDERS:
            raise t.error(path, f"not supported: {ep}; slmflow exports for "
                                f"{', '.join(EXECUTION_PROVIDERS)}")
        raise t.unknown(path, ep, [*EXECUTION_PROVIDERS, *OTHER_PROVIDERS], "execution provider")
    became = [t.put("export.execution_provider", EXECUTION_PROVIDERS[ep], path)]
    if ep == "CUDAExecutionProvider":
        became.append(t.put("finetune.device", "auto", path) + " (CUDA when available)")
    return "; ".join(became)


SYSTEM_REF = Special(handle_system_ref, "a system name (or inline system): LocalSystem: this "
                     "machine; AzureML: refused before any work (slmflow runs on AzureML through "
                     "its azureml work pool: deployment slmflow-pipeline/azureml)")
AML_SETTING = Special(handle_aml_setting, "a setting of the AzureML system, noted (slmflow runs on "
                      "AzureML through its azureml work pool)")
SYSTEM = Table({
    "type": Special(handle_system_type, "LocalSystem: this machine; AzureML: noted, refused where "
                    "host/target names it; Docker, PythonEnvironment, IsolatedORT refused"),
    "accelerators": Special(handle_accelerators, "LocalSystem: the execution_providers of its "
                            "accelerator apply as engine.execution_providers when engine.target "
                            "names it; AzureML: a setting of that system, noted"),
    **{key: AML_SETTING for key in (
        "aml_compute", "aml_docker_config", "aml_environment_config", "hf_token", "is_dev",
        "olive_managed_env", "requirements_file", "resources", "instance_count",
        "azureml_client_config", "tags", "datastores", "keyvault_name")},
}, wrapper="config")
