"""export.adapters=separate without a model: the builder's LoRA layout from PEFT weights, the
refusals (shape, version, config), and the adapter file's round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmflow import onnx_adapters as oa
from slmflow.configio import load_config
from slmflow.errors import ConfigError, StageCheckError

H, R, KV = 8, 2, 4  # hidden size, rank, k/v width (grouped-query: narrower than q)


def _params(fused_sizes=(H, KV, KV)) -> list[dict]:
    """The base's LoRA inputs for one layer with q, k, v (split from qkv_proj) and o_proj."""
    params = []
    for proj, out in zip(("q_proj", "k_proj", "v_proj"), fused_sizes, strict=True):
        params += [{"name": f"model.layers.0.attn.{proj}.lora_A.MatMul.weight", "shape": [H, R], "dtype": "float32"},
                   {"name": f"model.layers.0.attn.{proj}.lora_B.MatMul.weight", "shape": [R, out], "dtype": "float32"}]
    params += [{"name": "model.layers.0.attn.o_proj.lora_A.MatMul.weight", "shape": [H, R], "dtype": "float32"},
               {"name": "model.layers.0.attn.o_proj.lora_B.MatMul.weight", "shape": [R, H], "dtype": "float32"}]
    return params


def _peft(rank=R, fused_out=H + 2 * KV, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn"
    return {f"{prefix}.qkv_proj.lora_A.weight": rng.normal(size=(rank, H)).astype(np.float32),
            f"{prefix}.qkv_proj.lora_B.weight": rng.normal(size=(fused_out, rank)).astype(np.float32),
            f"{prefix}.o_proj.lora_A.weight": rng.normal(size=(rank, H)).astype(np.float32),
            f"{prefix}.o_proj.lora_B.weight": rng.normal(size=(H, rank)).astype(np.float32)}


CONFIG = {"r": R, "lora_alpha": 2 * R, "target_modules": ["qkv_proj", "o_proj"]}


def test_a_fused_qkv_adapter_is_split_as_the_builder_splits_it():
    peft = _peft()
    out = oa.adapter_tensors(CONFIG, peft, _params())
    a = peft["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] * 2.0  # alpha/r
    for proj in ("q_proj", "k_proj", "v_proj"):  # lora_A shared, transposed
        np.testing.assert_array_equal(out[f"model.layers.0.attn.{proj}.lora_A.MatMul.weight"], a.T)
    np.testing.assert_allclose(out["model.layers.0.attn.q_proj.lora_B.MatMul.weight"], b[:H].T)
    np.testing.assert_allclose(out["model.layers.0.attn.k_proj.lora_B.MatMul.weight"], b[H:H + KV].T)
    np.testing.assert_allclose(out["model.layers.0.attn.v_proj.lora_B.MatMul.weight"], b[H + KV:].T)


def test_rslora_scales_by_alpha_over_sqrt_r():
    peft = _peft()
    out = oa.adapter_tensors({**CONFIG, "use_rslora": True}, peft, _params())
    b = peft["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    np.testing.assert_allclose(out["model.layers.0.attn.o_proj.lora_B.MatMul.weight"],
                               (b * (2 * R / R ** 0.5)).T, rtol=1e-6)


def test_an_adapter_of_another_rank_is_refused_naming_both_shapes():
    with pytest.raises(StageCheckError, match=r"shape \[8, 4\], the base's input \[8, 2\]"):
        oa.adapter_tensors({**CONFIG, "r": 4}, _peft(rank=4), _params())


def test_an_adapter_missing_a_module_of_the_base_is_refused():
    peft = {k: v for k, v in _peft().items() if "o_proj" not in k}
    with pytest.raises(StageCheckError, match=r"no LoRA weight for layers.0.o_proj .* do not fit"):
        oa.adapter_tensors(CONFIG, peft, _params())


def test_an_adapter_with_modules_the_base_lacks_is_refused():
    peft = _peft() | {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": np.zeros((R, H), np.float32)}
    with pytest.raises(StageCheckError, match=r"no branch for: layers.0.down_proj.lora_A"):
        oa.adapter_tensors(CONFIG, peft, _params())


def test_check_fits_names_the_adapter_and_the_base():
    with pytest.raises(StageCheckError, match=r"adapter tickets \(target_modules \['q_proj'\], r 8\) "
                       r"does not fit base build k1 \(target_modules \['o_proj', 'qkv_proj'\], r 16\)"):
        oa.check_fits("tickets", {"target_modules": ["q_proj"], "r": 8}, "build k1",
                      {"target_modules": ["o_proj", "qkv_proj"], "r": 16})


def test_the_adapter_file_holds_what_was_written_and_its_base_version(tmp_path):
    import onnxruntime as ort

    tensors = oa.adapter_tensors(CONFIG, _peft(), _params())
    path = tmp_path / "a.onnx_adapter"
    oa.export_adapter(tensors, path, model_version=1234)
    back = ort.AdapterFormat.read_adapter(str(path))
    assert back.get_model_version() == 1234
    got = back.get_parameters()
    assert sorted(got) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(got[name].numpy(), value)
    oa.check_adapter_file(path, 1234, "base")  # fits: no error
    with pytest.raises(StageCheckError, match=r"^adapter a.onnx_adapter was exported for base "
                       r"version 1234, base X is version 99; export the adapter again"):
        oa.check_adapter_file(path, 99, "base X")


def test_lora_node_names_follow_the_builders_split_of_fused_modules():
    names = oa.lora_node_names(2, ["qkv_proj", "gate_up_proj"])
    assert "/model/layers.1/attn/v_proj/lora_B/MatMul" in names
    assert "/model/layers.0/mlp/up_proj/lora_A/MatMul" in names
    assert len(names) == 2 * (3 + 2) * 2


@pytest.mark.parametrize(("sets", "message"), [
    (["export.adapters=separate", "export.quantizer=hqq"], r"export.adapters=separate keeps the LoRA branches fp32"),
    (["export.adapters=separate", "export.recipe=auto", "export.search.candidates=[int4_rtn_b32, int4_gptq]"],
     (r"^config: export: export.search.candidates: export.adapters=separate cannot build int4_gptq "
     r"\(onnxruntime's GPTQ quantizer makes every MatMul int4, the LoRA branches too\); drop it "
     r"from the list, or use export.adapters=merged$")),
    (["export.adapters=separate", "export.recipe=auto", "export.search.candidates=[int4_sensitive, int4_hqq, int8]"],
     (r"cannot build int4_sensitive \(its int8 MatMuls are ranked on the merged fine-tune, so the "
     r"base would not be shared by other fine-tunes\); int4_hqq \(onnxruntime's HQQ quantizer .*\); "
     r"drop them from the list")),
    (["export.adapters=separate", "export.extra_options.adapter_path=x"], r"adapter_path is set by export.adapters=separate"),
    (["export.adapters=both"], r"export.adapters"),
])
def test_separate_adapter_configs_that_cannot_work_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


def test_a_separate_search_over_the_default_candidates_leaves_out_what_it_cannot_build():
    from slmflow import recipes
    from slmflow.config import DEFAULT_CANDIDATES
    from slmflow.configio import build_config

    config = load_config(None, ["export.adapters=separate", "export.recipe=auto"])
    again = build_config(config.model_dump(mode="json"), source="test")  # as Prefect and --set do
    assert again.export.search.candidates == list(DEFAULT_CANDIDATES)
    kept, left_out = recipes.separate_candidates(again.export.search)
    assert list(left_out) == ["int4_sensitive"] and "not be shared" in left_out["int4_sensitive"]
    assert kept == [n for n in DEFAULT_CANDIDATES if n != "int4_sensitive"]
    # named with merged exports, or with a manual separate run (no search): nothing refused
    load_config(None, ["export.recipe=auto", "export.search.candidates=[int4_gptq]"])
    load_config(None, ["export.adapters=separate", "export.search.candidates=[int4_gptq]"])


def test_a_candidates_base_build_is_the_manual_runs_of_that_recipe(tmp_path):
    """Keyed on the base model, the recipe and the LoRA shape: a search's candidate shares the
    base build with a manual run of its recipe and with every fine-tune of that shape."""
    from slmflow import recipes
    from slmflow.artifacts import ArtifactRef
    from slmflow.stages.export_separate import BASE_STAGE
    from slmflow.store import Store

    store = Store.at(tmp_path)
    base = ArtifactRef(kind="base_model", uri="/b", sha256="b" * 64, key="bkey", meta={})
    lora = {"target_modules": ["o_proj", "qkv_proj"], "r": 16}

    def key(cfg, shape=lora) -> str:
        return BASE_STAGE.key(cfg, store, base=base, lora=shape)

    manual = load_config(None, ["export.adapters=separate"]).export  # int4 k_quant
    auto = load_config(None, ["export.adapters=separate", "export.recipe=auto"]).export
    assert key(recipes.candidate_config(auto, "int4_k_quant")) == key(manual)
    assert key(recipes.candidate_config(auto, "int4_rtn_b32")) != key(manual)
    assert key(manual, {**lora, "r": 8}) != key(manual)


def test_separate_adapters_leave_the_merged_export_key_as_it_was():
    from slmflow.stages.export import key_config

    merged = load_config(None, []).export
    assert "adapters" not in key_config(merged)


def _separate_folder(root, name: str, task: str, r: int, version: int):
    """A published separate-form folder without a model: card, manifest, one adapter file."""
    folder = root / name / "model"
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_text("base")
    (folder / "manifest.json").write_text("{}")
    oa.export_adapter({"w": np.ones((2, r), np.float32)}, folder / f"{task}.onnx_adapter", version)
    card = {"format": "slmflow-classifier", "format_version": 1, "prompt_template": "{t}\n",
            "input_columns": ["t"], "labels": ["A", "B"], "max_new_tokens": 2,
            "guidance": {"type": "regex", "data": "(A|B)"}}
    lora = {"target_modules": ["o_proj"], "r": r}
    card["adapters"] = {"base_version": version, "lora": lora, "default": task, "files": {task: {
        "file": f"{task}.onnx_adapter", "base_version": version, "trained_on": {},
        "card": {k: v for k, v in card.items() if k != "adapters"}}}}
    (folder / "slmflow_model.json").write_text(json.dumps(card))
    return root / name


def test_a_bundle_of_two_adapters_shares_the_base_and_keeps_both_cards(tmp_path):
    from slmflow.bundle import bundle_folders
    from slmflow.modelcard import adapter_files, read_card

    one = _separate_folder(tmp_path, "one", "tones", 2, 5)
    two = _separate_folder(tmp_path, "two", "tickets", 2, 5)
    out = bundle_folders([one, two], tmp_path / "bundle")
    card = read_card(out)
    assert sorted(adapter_files(out, card)) == ["tickets", "tones"]
    assert card["adapters"]["default"] == "tones"
    assert (out / "model.onnx").stat().st_ino == (one / "model" / "model.onnx").stat().st_ino


def test_a_bundle_refuses_an_adapter_of_another_rank_naming_both(tmp_path):
    from slmflow.bundle import BundleError, bundle_folders

    one = _separate_folder(tmp_path, "one", "tones", 2, 5)
    two = _separate_folder(tmp_path, "two", "tickets", 4, 5)
    with pytest.raises(BundleError, match=r"adapter tickets \(.*two/model\) \(target_modules "
                       r"\['o_proj'\], r 4\) does not fit base .*one/model \(target_modules "
                       r"\['o_proj'\], r 2\)"):
        bundle_folders([one, two], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_refuses_an_adapter_of_another_base_build(tmp_path):
    from slmflow.bundle import BundleError, bundle_folders

    one = _separate_folder(tmp_path, "one", "tones", 2, 5)
    two = _separate_folder(tmp_path, "two", "tickets", 2, 6)
    with pytest.raises(BundleError, match=r"adapter tickets .* was exported for base version 6, "
                       r".*one/model is version 5: not the same base build"):
        bundle_folders([one, two], tmp_path / "bundle")


def test_a_bundle_of_a_merged_model_says_what_to_do(tmp_path):
    from slmflow.bundle import bundle_folders
    from slmflow.modelcard import ModelFolderError

    one = _separate_folder(tmp_path, "one", "tones", 2, 5)
    card_file = one / "model" / "slmflow_model.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "adapters": None}))
    with pytest.raises(ModelFolderError, match=r"holds a merged model, no adapter file; run it "
                       r"with export.adapters=separate"):
        bundle_folders([one], tmp_path / "bundle")


def test_slmflow_bundle_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    from slmflow.cli import main

    one = _separate_folder(tmp_path, "one", "tones", 2, 5)
    two = _separate_folder(tmp_path, "two", "tickets", 2, 6)
    assert main(["bundle", "--output", str(tmp_path / "b"), str(one), str(two)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter tickets") and err.count("\n") == 1
    assert not (tmp_path / "b").exists()
    assert main(["bundle", "--output", str(tmp_path / "b"), str(one), str(one / "model")]) == 2
    assert "two adapters are named tones" in capsys.readouterr().err
