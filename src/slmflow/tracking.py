"""One MLflow run per pipeline run (`tracking.*`): params, step metrics, metrics, artifacts, model.

What a run holds:
- params: the resolved config, flattened (`finetune.learning_rate`), each value within MLflow's
  limit; tags: the Prefect flow run (id, name, UI link), which stages were reused from the cache,
  the quality gate's verdict, the run's description (`mlflow.note.content`).
- metrics: the fine-tune's loss and learning rate per step (only when this run fine-tuned: a
  reused adapter's curve is in the run that trained it, named by the tag `slmflow.loss_curve_run`),
  each model's accuracy, macro-F1, latency and size on every eval set, fidelity, the gate, stage
  seconds and cached flags.
- artifacts: report/ (report.json, report.md, the pictures), manifest.json, and with
  `tracking.log_model` the published model folder, registered (slmflow.registry).

The MLflow client is imported only when tracking is on (`pip install 'slmflow[tracking]'`). No
secret reaches MLflow: the config holds none, the URI may not carry credentials (MLflow reads
MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD from the environment itself), and every value logged is
checked against the secrets in the environment (`redact`).
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slmflow.config import PipelineConfig
from slmflow.errors import ConfigError
from slmflow.tracking_check import redact, secret_values, tracking_uri
from slmflow.tracking_values import MAX_KEY, config_params, report_metrics

MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH (MLflow 3.17)
BATCH = 100           # MAX_PARAMS_TAGS_PER_BATCH; metrics may go 1000 at a time


def prefect_flow_run() -> dict[str, str]:
    """The Prefect flow run this code runs in: id, name, UI link ({} without Prefect)."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:  # noqa: BLE001 - no Prefect context: a plain run
        return {}
    if not run_id:
        return {}
    found = {"id": str(run_id), "name": str(flow_run.name or "")}
    url = flow_run.ui_url  # None when no UI is configured
    return found | ({"url": str(url)} if url else {})


def run_name(config: PipelineConfig, prefect: dict[str, str]) -> str:
    spec = config.model.name_or_path.rstrip("/")
    return config.tracking.run_name.format(
        output_name=Path(config.output_dir).name, flow_run_name=prefect.get("name", "local"),
        flow_run_id=prefect.get("id", "local"), model=re.split(r"[/:]", spec)[-1],
        recipe=config.export.recipe, date=time.strftime("%Y%m%d-%H%M%S", time.gmtime()))[:MAX_KEY]


class MlflowRun:
    """The MLflow run of one pipeline run (created at its start, ended with its status)."""

    def __init__(self, config: PipelineConfig) -> None:
        from mlflow import MlflowClient

        self.config, self.cfg = config, config.tracking
        self.uri = tracking_uri(self.cfg)
        self.failed = False
        self.client = MlflowClient(self.uri)
        self.secrets = secret_values()
        self.prefect = prefect_flow_run()
        # An AzureML job comes with its own run (MLFLOW_RUN_ID, in the workspace's azureml://
        # store): log there, AzureML ends it. Another server never knows that run id.
        self.owned = not (urllib.parse.urlparse(self.uri).scheme == "azureml"
                          and os.environ.get("MLFLOW_RUN_ID"))
        if self.owned:
            self.experiment_id = self._experiment()
            tags = {"slmflow.output_dir": str(Path(config.output_dir).resolve())} | {
                f"slmflow.prefect.flow_run_{k}": v for k, v in self.prefect.items()}
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name(
                config, self.prefect), tags=self._clean(tags)).info.run_id
        else:
            self.run_id = os.environ["MLFLOW_RUN_ID"]
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            self._tags({f"slmflow.prefect.flow_run_{k}": v for k, v in self.prefect.items()})
        self.url = self._run_url()
        self._log_params()
        print(f"tracking: MLflow run {self.run_id}" + (f" ({self.url})" if self.url else ""),
              file=sys.stderr, flush=True)
        self._link_from_prefect()

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.cfg.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.cfg.experiment)
        except MlflowException:  # created meanwhile by a run started together
            return self.client.get_experiment_by_name(self.cfg.experiment).experiment_id

    def _run_url(self) -> str | None:
        if urllib.parse.urlparse(self.uri).scheme not in ("http", "https"):
            return None  # AzureML Studio and Databricks show the run in their own UI
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _link_from_prefect(self) -> None:
        """The Prefect flow run shows the MLflow run (a link artifact, or its id)."""
        if not self.prefect:
            return
        from prefect.artifacts import create_link_artifact, create_markdown_artifact

        if self.url:
            create_link_artifact(self.url, link_text=f"MLflow run {self.run_id}", key="mlflow-run",
                                 description="This flow run's MLflow run")
        else:
            create_markdown_artifact(f"MLflow run `{self.run_id}` ({self.uri.split('://')[0]}: "
                                     "see the workspace's Jobs or Experiments page)",
                                     key="mlflow-run", description="This flow run's MLflow run")

    def _clean(self, tags: dict[str, str]) -> dict[str, str]:
        return {k[:MAX_KEY]: redact(str(v), self.secrets)[:MAX_TAG_VALUE] for k, v in tags.items()}

    def _tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._clean(tags).items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + BATCH])

    def _log_params(self) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in config_params(self.config, self.secrets).items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])

    def _metrics(self, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v, step in rows]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def _loss_curve_run(self, key: str) -> str | None:
        """The earlier run that fine-tuned this adapter (its loss curve is there)."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`slmflow.finetune.key` = '{key}' and "
                          "tags.`slmflow.finetune.cached` = 'false'")
        return runs[0].info.run_id if runs else None

    def log_report(self, report: dict[str, Any], report_path: Path, model_dir: Path) -> None:
        """Everything the run produced: metrics, the loss per step, tags, artifacts, the model."""
        stages = report.get("stages", {})
        reused = [label for label, s in stages.items() if s.get("cached")]
        built = [label for label, s in stages.items() if not s.get("cached")]
        finetune = stages.get("finetune", {})
        rows = [(k, v, 0) for k, v in report_metrics(report).items()]
        tags = {"slmflow.reused_stages": ",".join(reused), "slmflow.built_stages": ",".join(built),
                "slmflow.finetune.key": finetune.get("key", ""),
                "slmflow.finetune.cached": str(bool(finetune.get("cached"))).lower(),
                "slmflow.export.sha256": stages.get("export", {}).get("sha256", ""),
                "slmflow.quality_gate": "passed" if report["quality_gate"]["passed"] else "failed"}
        note = [f"slmflow run of `{self.config.output_dir}`.",
                (f"Stages reused from the cache: {', '.join(reused) or 'none'}; "
                 f"built: {', '.join(built) or 'none'}.")]
        if finetune.get("cached"):  # its steps were logged by the run that trained it, not again
            earlier = self._loss_curve_run(finetune.get("key", ""))
            if earlier:
                tags["slmflow.loss_curve_run"] = earlier
            note.append("The fine-tune was reused: its loss curve is in "
                        + (f"run {earlier}." if earlier else "the run that trained it."))
        else:
            for point in report.get("training", {}).get("loss_curve") or []:
                rows.append(("train/loss", float(point["loss"]), int(point["step"])))
                if "learning_rate" in point:
                    rows.append(("train/learning_rate", float(point["learning_rate"]),
                                 int(point["step"])))
        if self.prefect.get("url"):
            note.append(f"Prefect flow run: {self.prefect['url']}")
        self._metrics(rows)
        out_dir = report_path.parent
        for name in ("report.json", "report.md", *sorted(p.name for p in out_dir.glob("*.svg"))):
            self.client.log_artifact(self.run_id, str(out_dir / name), "report")
        self.client.log_artifact(self.run_id, str(model_dir / "manifest.json"))
        if self.cfg.log_model:
            tags |= self._register(model_dir, report["quality_gate"]["passed"], note)
        tags["mlflow.note.content"] = "\n\n".join(note)
        self._tags(tags)

    def _register(self, model_dir: Path, passed: bool, note: list[str]) -> dict[str, str]:
        if not passed:
            note.append("The quality gate failed: the model was not registered.")
            return {"slmflow.model_version": "none (quality gate failed)"}
        from slmflow.registry import register_model_folder

        version, reused = register_model_folder(self.client, self.run_id, model_dir, self.cfg.model_name)
        note.append(f"Model: {self.cfg.model_name} version {version}"
                    + (" (registered before: same files)." if reused else "."))
        print(f"tracking: model {self.cfg.model_name} version {version}"
              + (" (already registered)" if reused else ""), file=sys.stderr, flush=True)
        return {"slmflow.model_name": self.cfg.model_name, "slmflow.model_version": version,
                "slmflow.model_version_reused": str(reused).lower()}

    def log_outcome(self, report: dict[str, Any], report_path: Path, model_dir: Path) -> None:
        """log_report; a tracking server that fails now costs the run its MLflow record, not its
        outputs (they are written): one line on stderr, and the MLflow run ends FAILED."""
        try:
            self.log_report(report, report_path, model_dir)
        except Exception as exc:  # noqa: BLE001 - outputs are complete; say what was not logged
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            print(f"tracking: logging to MLflow run {self.run_id} failed ({type(exc).__name__}: "
                  f"{redact(first, self.secrets)}); the run's outputs are complete",
                  file=sys.stderr, flush=True)
            self.failed = True

    def end(self, status: str) -> None:
        status = "FAILED" if self.failed and status == "FINISHED" else status
        if self.owned:
            self.client.set_terminated(self.run_id, status)


@contextmanager
def tracked(config: PipelineConfig) -> Iterator[MlflowRun | None]:
    """The run's MLflow run (None when tracking is off), ended FINISHED, FAILED (an error, the
    quality gate) or KILLED (interrupted)."""
    if not config.tracking.enabled:
        yield None
        return
    try:
        run = MlflowRun(config)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the server went away since the preflight, or refuses
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ConfigError(f"tracking.uri: could not start an MLflow run ({type(exc).__name__}: "
                          f"{redact(first, secret_values())}); no stage has run; fix the server "
                          "or set tracking.enabled=false") from None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        try:
            run.end(status)
        except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more
            print(f"tracking: could not end MLflow run {run.run_id}: {type(exc).__name__}",
                  file=sys.stderr, flush=True)
