"""The local Kubernetes control plane used for development and the cluster test tier."""
