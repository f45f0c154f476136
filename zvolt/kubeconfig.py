"""Where zvolt's programs find the Kubernetes API: the pod's service account inside a cluster,
else the caller's kubeconfig (the one-shot tools run by `kubectl zvolt`, and the tests)."""

from __future__ import annotations


def load() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
