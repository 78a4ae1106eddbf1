"""AzureML: a Prefect worker that runs flow runs as AzureML command jobs, and Azure inputs.

- `worker`: the `azureml` worker type (registered through the `prefect.collections` entry point,
  so `prefect work-pool create NAME --type azureml` works once slmflow is installed).
- `job`: a flow run plus job variables → an `azure.ai.ml` command job (pure; no network).
- `client`: the one place that talks to the Azure SDK (tests inject a fake).
- `launch`: what the job runs: resolves Key Vault secret references, then the Prefect engine.
- `uris`: `azureml://` references (registry models, datastore paths), parsed without network.
- `inputs`: downloads a registry model or datastore file into the stage store.

Importing this package imports no Azure SDK (Prefect loads the worker module in every CLI call).
"""
