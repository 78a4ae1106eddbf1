"""AzureML: a Prefect worker that runs flow runs as AzureML command jobs, and Azure inputs.

- `worker`: the `azureml` worker type (registered through the `prefect.collections` entry point,
  so `prefect work-pool create NAME --type azureml` works once slmflow is installed).
- `job`: a flow run plus job variables → an `azure.ai.ml` command job (pure; no network).
- `client`: the one place that talks to the Azure SDK (tests inject a fake).
- `launch`: what the job runs: resolves Key Vault secret references, then the Prefect engine.
- `inputs`: downloads a registry model or datastore file into the stage store, and reads Key
  Vault secrets: the `azureml` and `keyvault` schemes that slmflow's core resolves through the
  `slmflow.schemes` entry points (the core never imports this package; `slmflow.uris` parses
  the references' shapes without network).

Importing this package imports no Azure SDK (Prefect loads the worker module in every CLI call).
"""
