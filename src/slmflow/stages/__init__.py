"""The pipeline's stages, one module each: a `Stage` (what its output is keyed by) and its build.

`slmflow.stage.run_stage` runs any of them; the flow (`flows/pipeline.py`) wires them, the plain
runner and the Prefect task (`tasks/`) both read this table.
"""

from slmflow.stage import Stage
from slmflow.stages import (
    base_model,
    evaluate,
    export,
    export_separate,
    finetune,
    given_adapter,
    merge,
    prepare_data,
)

STAGES: dict[str, Stage] = {m.STAGE.name: m.STAGE for m in (
    base_model, prepare_data, finetune, given_adapter, merge, export, evaluate)} | {
    s.name: s for s in (export_separate.BASE_STAGE, export_separate.ADAPTER_STAGE)}
