"""The front door under fuzzing: no config, however mangled, crashes the CLI.

Hypothesis mutates valid configs of both dialects: slmflow's own (configs/*.yaml, pointed at the
tiny Phi-3 and the small tone data) and Olive's (the seed's example config and its blocks, Olive
0.13's example). A mutation swaps in a wrong-typed value at any key (int, float, str, bool, list,
dict, null), deletes a key, adds an extra one, wraps a value in a container, nests it thousands
of levels deep or makes it a YAML alias bomb, or uses a huge or negative number, NaN/inf, or an
odd string (empty, unicode, very long, path-like, azureml://..., pkg:..., hf:...). Each config is
written to a file (YAML or JSON) and run through the real CLI in process: `slmflow validate
--config FILE`, and `slmflow convert-olive FILE` for Olive configs. Every case must end in exit 0,
or exit 2 with exactly one line on stderr starting with `error: `: never a traceback, never
another exit status, never a network connection, never seconds.

Offline by construction: HF_HUB_OFFLINE is set (a string mutated into a hub id or an hf: dataset
fails fast with one line), the AzureML workspace variables are unset (a short-form datastore file
fails fast naming them), sockets refuse to connect and record the attempt. The generator makes no
well-formed long-form datastore URI (azureml://subscriptions/...): `validate` downloads such a
file, asking the Azure credential chain first (seconds, and multi-line warnings from
azure.identity), which is the preflight's business, not the front door's.

The fast profile (`make test`) runs 2,100 mutated configs, derandomized (the same ones every run:
about 20 s here); `pytest -m fuzz tests/unit/test_fuzz_configs.py` runs the long profile, 40,000
fresh random ones (minutes).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmflow.cli import main

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
OLIVE = ASSETS / "olive"
TONES = REPO / "src" / "slmflow" / "data" / "tones_small.jsonl"
SLOW_CASE_S = 10  # one case must take no longer (a busy 2-core machine included)

FAST = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FAST_OLIVE = settings(FAST, max_examples=1100)
LONG = settings(max_examples=20_000, deadline=None, derandomize=False, database=None,
                suppress_health_check=list(HealthCheck))

ODD_STRINGS = [
    "", " ", "\n", "\r\n", "\t", "\u2028", "\x85", "ü", "日本語", "😀", "\ud800", "x" * 5000,
    "a\x00b", ".", "..", "/", "~", "~/x", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\x",
    "dataset/dataset-classification.json", "data/train.jsonl", "nosuch.jsonl", "out",
    "azureml:", "azureml://", "azureml:x", "azureml://registries/r/models/n/versions/1",
    "azureml://registries/r/models/n", "azureml://datastores/d/paths/p.jsonl",
    "azureml://datastores/d/paths/", "pkg:", "pkg:slmflow", "pkg:slmflow/data/tones_small.jsonl",
    "pkg:nosuch/x.jsonl", "pkg:.x/y", "pkg:os.path/x", "pkg:/x", "hf:", "hf:/", "hf:x",
    "hf:org/name", "org/model", "{", "}", "{}", "{0}", "{phrase}", "{tone", "{a.b}", "{a[0]}",
    "%s", "null", "None", "true", "1e-4", "NaN", "-1", "LoRA", "QLoRA", "MergeAdapterWeights",
    "ModelBuilder", "join", "line-by-line", "int4", "cuda", "CUDAExecutionProvider", "LocalSystem",
    "AzureML", "HfModel", "text-generation", "tones_train", "local_system", "aml",
]
ALIAS_BOMB = "[" + ", ".join(f"&a{k} [" + ", ".join(["x"] * 9 if k == 0 else [f"*a{k - 1}"] * 9)
                             + "]" for k in range(10)) + "]"
NUMBERS = [0, 1, -1, 2, 0.5, -0.5, 1.5, 2**31, 2**63, -(2**63), 10**100, 1e308, -1e-308, 0.0,
           -0.0, float("nan"), float("inf"), float("-inf")]


@functools.cache
def known_keys() -> list[str]:
    """Every key either dialect knows: extra keys that are valid somewhere else, or near-typos."""
    from slmflow.config import PipelineConfig
    from slmflow.olive.reference import SECTIONS

    keys = {k for table, _ in SECTIONS for k in table.keys} | {"config", "params", "extra_args"}
    keys |= set(PipelineConfig.model_fields)
    for name in PipelineConfig.model_fields:
        annotation = PipelineConfig.model_fields[name].annotation
        keys |= set(getattr(annotation, "model_fields", {}))
    return sorted(keys)


@functools.cache
def scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_STRINGS),
        st.text(max_size=12),
    )


@functools.cache
def odd_values() -> st.SearchStrategy:
    """Any value a config file can hold, weighted to the ones that break naive code."""
    containers = st.recursive(
        scalars(), lambda inner: st.one_of(st.lists(inner, max_size=3),
                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=6)
    return st.one_of(scalars(), containers, st.builds(list), st.builds(dict))  # fresh ones: mutable


@functools.cache
def map_keys() -> st.SearchStrategy:
    return st.one_of(st.sampled_from(known_keys()), st.text(max_size=12), st.integers(-3, 3),
                     st.booleans(), st.none())


def paths(node: Any, at: tuple = ()) -> list[tuple]:
    """Every position in a config: the root, each mapping key, each list item."""
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, (*at, i))
    return found


def parent_of(config: Any, at: tuple) -> Any:
    node = config
    for part in at[:-1]:
        node = node[part]
    return node


@st.composite
def mutations(draw, bases: list[Base]) -> tuple[Base, Any, list[str]]:
    """A base config with one to three mutations, and what was done (for the failure report)."""
    base = draw(st.sampled_from(bases))
    config: Any = copy.deepcopy(base.config)
    done = []
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        at = draw(st.sampled_from(paths(config)))
        how = draw(st.sampled_from(["replace"] * 5 + ["null", "delete"] * 2 + ["extra"] * 3
                                   + ["wrap"] * 2 + ["deep", "bomb"]))
        if not at:  # the root: a file that is no mapping, or one more top-level key
            how = "replace" if how in ("replace", "null", "deep", "bomb") else "extra"
        node = parent_of(config, at) if at else None
        if how == "replace":
            value = draw(odd_values())
        elif how == "null":
            value = None
        elif how == "deep":  # written as [[[...]]]: deeper than any config, or than the parsers go
            value = f"__DEEP_{draw(st.sampled_from([65, 1500]))}__"
        elif how == "bomb":  # written as a YAML alias bomb (9**9 values once expanded)
            value = "__BOMB__"
        elif how == "wrap":
            value = draw(st.sampled_from([lambda v: [v], lambda v: {"config": v},
                                          lambda v: {"x": v}, lambda v: [[v]]]))(node[at[-1]])
        elif how == "delete":
            del node[at[-1]]
            done.append(f"delete {list(at)}")
            continue
        else:  # extra: a key added to the mapping at `at` (or, for any other value, its parent)
            target = parent_of(config, (*at, None))
            if not isinstance(target, dict):
                target, at = config if isinstance(config, dict) else {}, ()
            key, value = draw(map_keys()), draw(odd_values())
            target[key] = value
            done.append(f"extra {list(at)} {key!r} = {value!r}"[:300])
            continue
        if at:
            node[at[-1]] = value
        else:
            config = value
        done.append(f"{how} {list(at)} = {value!r}"[:300])
    return base, config, done


@dataclass
class Base:
    name: str
    dialect: str  # "slmflow" or "olive"
    config: dict
    commands: tuple[str, ...] = ("validate",)


@dataclass
class FrontDoor:
    """The working folder, the valid bases, and the CLI run under the checks."""

    work: Path
    bases: list[Base]
    connections: list = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)

    def write(self, config: Any, as_yaml: bool) -> Path:
        path = self.work / "cases" / ("config.yaml" if as_yaml else "config.json")
        text = None
        if "__DEEP_1500__" in json.dumps(config):  # as JSON: PyYAML takes a second to refuse it
            as_yaml, path = False, path.with_suffix(".json")
        if as_yaml:
            try:
                text = yaml.safe_dump(config, allow_unicode=True)
            except (UnicodeEncodeError, yaml.YAMLError):  # a lone surrogate: JSON escapes it
                path = path.with_suffix(".json")
        text = text or json.dumps(config)
        quote = "" if path.suffix == ".yaml" else '"'
        for depth in (65, 1500):
            text = text.replace(f"{quote}__DEEP_{depth}__{quote}", "[" * depth + "]" * depth)
        text = text.replace(f"{quote}__BOMB__{quote}", ALIAS_BOMB if quote == "" else "[[1]]")
        path.write_text(text, encoding="utf-8")
        return path

    def check(self, base: Base, config: Any, done: list[str], as_yaml: bool) -> None:
        path = self.write(config, as_yaml)
        for command in base.commands:
            argv = [command, "--config", str(path)] if command == "validate" else [command, str(path)]
            rc, out, err, seconds = run_cli(argv)
            where = f"{base.name}: {' ; '.join(done)}: slmflow {' '.join(argv[:-1])}"
            assert rc in (0, 2), f"{where}: exit {rc}\n{err}"
            assert "Traceback" not in out + err, f"{where}\n{err}"
            if rc == 2:
                assert err.startswith("error: ") and len(err.splitlines()) == 1, f"{where}\n{err!r}"
                assert err.endswith("\n") and out == "", f"{where}\n{err!r}\n{out!r}"
            else:
                assert "error: " not in err, f"{where}\n{err}"
            assert not self.connections, f"{where}: connected to {self.connections}"
            assert seconds < SLOW_CASE_S, f"{where}: took {seconds:.1f} s"
            self.outcomes[(base.dialect, command, rc)] += 1


def run_cli(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - started


def olive_asset(name: str) -> dict:
    return json.loads((OLIVE / f"{name}.json").read_text())


def make_bases(tiny: Path) -> list[Base]:
    """The valid configs the mutations start from: each validates (exit 0) as it is."""
    bases = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        config["model"] = {"source": "hf", "name_or_path": str(tiny)}
        config["data"] = {**config["data"], "train_file": "pkg:slmflow/data/tones_small.jsonl"}
        # runnable here: the tiny model's modules, and the device this machine has (a CUDA
        # config is refused before any work where no GPU is visible)
        config["finetune"] = {**config["finetune"], "target_modules": ["qkv_proj", "o_proj"],
                              "device": "auto"}
        config["output_dir"] = "out"
        bases.append(Base(path.stem, "slmflow", config))
    bases.append(Base("slmflow-data-file", "slmflow", {
        "model": {"source": "hf", "name_or_path": str(tiny)},
        "data": {"train_file": "data/train.jsonl", "eval_file": "data/eval.jsonl"},
        "finetune": {"target_modules": ["qkv_proj", "o_proj"]}, "output_dir": "out"}))

    seed = olive_asset("seed_full")
    seed["engine"] = {k: v for k, v in seed["engine"].items() if k not in ("host", "target")}
    seed["input_model"]["config"]["hf_config"]["model_name"] = str(tiny)
    both = ("validate", "convert-olive")
    bases.append(Base("seed_full", "olive", seed, both))
    registry = {**copy.deepcopy(seed), **olive_asset("seed_model_registry")}
    bases.append(Base("seed_model_registry", "olive", registry, both))
    as_is = olive_asset("seed_full")  # AzureML host/target: convert-olive shows it, run stops
    bases.append(Base("seed_full-azureml-host", "olive", as_is, ("convert-olive",)))
    datastore = {**copy.deepcopy(seed), **olive_asset("seed_data_azureml")}
    bases.append(Base("seed_data_azureml", "olive", datastore, ("convert-olive",)))
    olive013 = olive_asset("olive013")
    olive013["input_model"]["model_path"] = str(tiny)
    bases.append(Base("olive013", "olive", olive013, both))
    return bases


@pytest.fixture(scope="module")
def front_door(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A working folder holding the bases' data files, offline, with sockets that refuse."""
    import datasets.config
    import huggingface_hub.constants
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("fuzz")
    for rel in ("dataset/dataset-classification.json", "data/train.jsonl"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TONES, work / rel)
    shutil.copy(ASSETS / "tones_other.jsonl", work / "data" / "eval.jsonl")
    (work / "cases").mkdir()
    door = FrontDoor(work, make_bases(tiny_model))
    # Threads already running belong to earlier tests (a Prefect events or log worker still
    # retrying a server that test stopped): refused too, but not the front door's doing.
    earlier = {t.ident for t in threading.enumerate() if t is not threading.main_thread()}

    def refuse(sock: socket.socket, address: Any, *args: Any) -> None:
        if threading.get_ident() not in earlier:
            door.connections.append(address)
        raise OSError("network disabled by the fuzz test")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # relative paths of the bases (dataset/..., data/..., out) resolve here
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        for var in ("SLMFLOW_AZUREML_SUBSCRIPTION_ID", "SLMFLOW_AZUREML_RESOURCE_GROUP",
                    "SLMFLOW_AZUREML_WORKSPACE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID",
                    "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
            mp.delenv(var, raising=False)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.delenv("PREFECT_API_URL", raising=False)
        # No Prefect API either: in a whole-suite run the e2e tests' session server is still
        # configured, and `validate` of a config with placement asks it for the work pools.
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield door


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.parts[-2:-1] != ("cases",)}


def fuzz(door: FrontDoor, dialect: str, profile: settings) -> list[int]:
    """Run `profile`'s examples of mutated `dialect` configs; returns one entry per example."""
    bases = [b for b in door.bases if b.dialect == dialect]
    seen: list[int] = []

    @profile
    @given(case=mutations(bases), as_yaml=st.booleans() if dialect == "slmflow" else
           st.sampled_from([False, False, False, True]))
    def one(case: tuple[Base, Any, list[str]], as_yaml: bool) -> None:
        seen.append(1)
        door.check(*case, as_yaml)

    before = snapshot(door.work)
    one()
    assert snapshot(door.work) == before, "a case wrote into the working folder"
    return seen


@pytest.mark.parametrize("name", ["tiny-phi3_lora_cpu", "tiny-phi3_qlora_cpu", "phi3-mini_qlora_cuda",
                                  "smollm2-135m_lora_cpu", "slmflow-data-file", "seed_full",
                                  "seed_model_registry", "olive013"])
def test_the_bases_validate_as_they_are(front_door: FrontDoor, name: str):
    """Mutations start from configs that pass, so a valid mutation really validates."""
    base = next(b for b in front_door.bases if b.name == name)
    rc, out, err, _ = run_cli(["validate", "--config", str(front_door.write(base.config, False))])
    assert rc == 0 and out.startswith("ok: model "), err


@pytest.mark.parametrize("name", ["seed_full-azureml-host", "seed_data_azureml", "olive013"])
def test_the_convert_olive_bases_convert(front_door: FrontDoor, name: str):
    base = next(b for b in front_door.bases if b.name == name)
    rc, out, err, _ = run_cli(["convert-olive", str(front_door.write(base.config, False))])
    assert rc == 0 and out.startswith("model:\n"), err


OFFLINE_AZUREML = [  # (model, train_file, exit status, the one line)
    ("azureml://registries/r/models/n/versions/1", None, 0, r"^ok: model azureml://registries/"),
    (None, "azureml://datastores/d/paths/p.jsonl", 2,
     (r"^error: .*data\.train_file: an azureml://datastores/\.\.\. path needs the workspace: set "
      r"SLMFLOW_AZUREML_SUBSCRIPTION_ID")),
    (None, "azureml://datastores/d/paths/", 2,
     r"^error: .*data\.train_file: .* is not an AzureML datastore file"),
    ("azureml://registries/r/models/n", None, 2,
     r"^error: .*model\.name_or_path: .* is not an AzureML registry model"),
]


@pytest.mark.parametrize("model, train_file, rc, match", OFFLINE_AZUREML)
def test_azureml_references_validate_offline_without_azure(front_door: FrontDoor, model, train_file,
                                                           rc, match):
    """What the generator makes of azureml:// values: a registry model is checked for shape only
    (the base-model stage downloads it); a short-form datastore file stops naming the workspace
    variables, before any Azure call. (A long-form one is downloaded by validate: not generated.)"""
    config = copy.deepcopy(next(b for b in front_door.bases if b.name == "slmflow-data-file").config)
    if model:
        config["model"] = {"source": "azureml_registry", "name_or_path": model}
    if train_file:
        config["data"]["train_file"] = train_file
    got, out, err, seconds = run_cli(["validate", "--config", str(front_door.write(config, False))])
    assert (got, len((out if rc == 0 else err).splitlines())) == (rc, 1), err
    assert re.search(match, out if rc == 0 else err), out + err
    assert seconds < 2 and not front_door.connections


def test_mutated_slmflow_configs_end_in_exit_0_or_one_error_line(front_door: FrontDoor):
    seen = fuzz(front_door, "slmflow", FAST)
    outcomes = {k: v for k, v in front_door.outcomes.items() if k[0] == "slmflow"}
    print(f"{len(seen)} mutated configs: {outcomes}")  # (dialect, command, exit status): count
    assert len(seen) >= 1000, len(seen)
    assert outcomes[("slmflow", "validate", 0)] >= 30, outcomes  # mutations that still validate


def test_mutated_olive_configs_end_in_exit_0_or_one_error_line(front_door: FrontDoor):
    seen = fuzz(front_door, "olive", FAST_OLIVE)
    outcomes = {k: v for k, v in front_door.outcomes.items() if k[0] == "olive"}
    print(f"{len(seen)} mutated configs: {outcomes}")  # (dialect, command, exit status): count
    assert len(seen) >= 1100, len(seen)
    assert outcomes[("olive", "validate", 0)] >= 30, outcomes
    assert outcomes[("olive", "convert-olive", 0)] >= 30, outcomes


@pytest.mark.fuzz
@pytest.mark.parametrize("dialect", ["slmflow", "olive"])
def test_long_fuzz(front_door: FrontDoor, dialect: str):
    """The long profile: fresh random mutations (minutes; `pytest -m fuzz`)."""
    assert len(fuzz(front_door, dialect, LONG)) == LONG.max_examples
