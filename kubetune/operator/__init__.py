"""The Kopf operator: `main.py` registers handlers; `builders.py` and `status.py` are pure;
`k8s.py` is the one module that calls the Kubernetes API."""
