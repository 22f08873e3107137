"""The Kopf operator: `main.py` registers handlers; `reconcile/` runs one reconcile of a
FineTuneJob against the API as `kubeapi.KubeApi` describes it; `builders/` and `status.py`
are pure; `k8s.py` is the one module that calls the Kubernetes API."""
