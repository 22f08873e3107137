"""kubetune: a Kubernetes-native fine-tuning operator."""

__version__ = "0.1.0.dev0"
