"""The third test layer: a real Kubernetes control plane on 127.0.0.1 (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, snapshot-controller), the project's chart installed
into it with Helm, and the chart's controller containers run as local processes with their
own ServiceAccount tokens. Binaries come from $ZVOLT_K8S_BIN (see lab/k8sbin.py)."""
