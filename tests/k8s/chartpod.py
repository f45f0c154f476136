"""The project's chart in the test control plane: `helm install` through helm_python, and the
installed controller Deployment turned into local processes, one per container.

There is no kubelet here, so the harness plays its part for one pod of the Deployment: it reads
the Deployment back from the API server (what Helm created, not what the chart renders
offline), picks the Pod the ReplicaSet created (Pending: there are no nodes) for the downward
API and for the pod-bound ServiceAccount token, and gives each container

- argv = command/args with $(VAR) expanded from the container's env, as kubelet does;
- env  = the container's env (values, fieldRef metadata.namespace/name/uid, ...);
- volumes mapped to directories: emptyDir -> an empty directory shared by the containers,
  secret -> the Secret's files; every mountPath in argv/env is rewritten to its directory;
- declared containerPorts mapped to free ports on 127.0.0.1 (`HOST:PORT` and `--*-port=N`
  values are rewritten);
- the pod's identity: `--kubeconfig` (the kubernetes-csi sidecars that call the API) or
  $KUBECONFIG (zvolt-csi) pointing at a kubeconfig with a TokenRequest token of the pod's
  ServiceAccount, so each process has exactly that ServiceAccount's RBAC.

Everything the harness changed is recorded per container (`LocalContainer.changes`).
Sidecar binaries come from $ZVOLT_K8S_BIN by image name; `command` entries (zvolt-csi) from a
mapping the caller gives (the venv's console scripts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from base64 import b64decode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
from kubernetes import client

from kubectl_zvolt.kube import ExecInput
from lab.k8sbin import k8s_bin, k8s_bin_dir

from .controlplane import ControlPlane, Obj
from .procs import HarnessError, Process, wait_for

CHART = Path(__file__).resolve().parents[2] / "charts" / "zvolt"
VENV_BIN = Path(sys.executable).parent
# Sidecars that talk to the API server take --kubeconfig; livenessprobe has no such flag.
KUBE_CLIENT_SIDECARS = frozenset({"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"})
# Container commands that are Python console scripts of this project.
PROJECT_COMMANDS = frozenset({"zvolt-csi", "zvolt-agent"})

_VAR = re.compile(r"\$\$|\$\(([^)]*)\)")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]*\]|[^:\s]*):(?P<port>\d{1,5})$")


def project_commands() -> dict[str, Path]:
    """zvolt-csi etc. from the venv this test runs in (/work/main/.venv/bin), else from PATH."""
    found: dict[str, Path] = {}
    for name in PROJECT_COMMANDS:
        path = VENV_BIN / name
        if path.is_file():
            found[name] = path
        elif (which := shutil.which(name)) is not None:
            found[name] = Path(which)
    return found


def helm_install(cp: ControlPlane, release: str, namespace: str, values: Mapping[str, Any],
                 timeout: int = 120) -> Obj:
    """`helm install RELEASE charts/zvolt -n NAMESPACE --create-namespace` as the cluster admin."""
    with helm_python.Config(kubeconfig_path=cp.admin_kubeconfig, namespace=namespace) as cfg:
        return cfg.install(CHART, release, dict(values), namespace=namespace, create_namespace=True,
                           timeout=timeout)


def helm_uninstall(cp: ControlPlane, release: str, namespace: str) -> None:
    with helm_python.Config(kubeconfig_path=cp.admin_kubeconfig, namespace=namespace) as cfg:
        cfg.uninstall(release, ignore_not_found=True, timeout=60)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined references are replaced, `$$` is a literal `$`,
    anything else (an undefined reference included) stays as written."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(repl, text)


def image_name(image: str) -> str:
    """registry.k8s.io/sig-storage/csi-provisioner:v6.4.0 -> csi-provisioner."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


@dataclass(frozen=True)
class Chart:
    """The chart as installed for the session."""

    release: str
    namespace: str
    summary: Obj
    controller: str  # the controller Deployment's name


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    name: str
    uid: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LocalContainer:
    name: str
    image: str
    binary: str  # the program's name: the image's name, or the command's
    argv: list[str]
    env: dict[str, str]
    chart_argv: list[str]  # command + args as the Deployment has them, before any change
    changes: list[str] = field(default_factory=list)
    # (mount path in the container, local directory), longest first; and the port map
    mounts: list[tuple[str, Path]] = field(default_factory=list)
    ports: Mapping[int, int] = field(default_factory=dict)

    def local_args(self, args: list[str]) -> list[str]:
        """Container paths and ports in `args` as this machine has them."""
        return [_rewrite_port(_rewrite_paths(a, self.mounts), self.ports) for a in args]


@dataclass
class LocalPod:
    identity: PodIdentity
    root: Path
    kubeconfig: Path
    volumes: dict[str, Path]
    ports: dict[int, int]  # containerPort -> port on 127.0.0.1
    containers: dict[str, LocalContainer]
    deployment: Obj

    def port(self, name: str) -> int:
        """The local port of the containerPort with this name (e.g. "healthz")."""
        for c in self.deployment["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == name:
                    return self.ports[int(p["containerPort"])]
        raise KeyError(name)

    def path(self, container_path: str) -> Path:
        """Where a path inside the pod's containers is on this machine."""
        for c in self.deployment["spec"]["template"]["spec"]["containers"]:
            for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
                mp = m["mountPath"].rstrip("/")
                if container_path == mp or container_path.startswith(mp + "/"):
                    return self.volumes[m["name"]] / container_path[len(mp):].lstrip("/")
        raise KeyError(container_path)


def plain(api: Any, obj: Any) -> Obj:
    """A client model as the API's JSON (camelCase keys, as in YAML)."""
    result: Obj = api.sanitize_for_serialization(obj)
    return result


def find_pod(cp: ControlPlane, namespace: str, deployment: Obj, timeout: float = 60) -> Obj:
    """The Pod the Deployment's ReplicaSet created (kube-controller-manager makes it; it stays
    Pending without nodes)."""
    core = client.CoreV1Api(cp.api)
    labels = deployment["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    def pod() -> Obj | None:
        items = core.list_namespaced_pod(namespace, label_selector=selector).items
        live = [p for p in items if p.metadata.deletion_timestamp is None]
        return plain(cp.api, sorted(live, key=lambda p: p.metadata.name)[0]) if live else None

    return wait_for(f"a Pod of Deployment {namespace}/{deployment['metadata']['name']}", pod, timeout,
                    watch=[cp.procs.get("kube-controller-manager")])


def _env_value(item: Obj, pod: PodIdentity, env: Mapping[str, str], cp: ControlPlane) -> str:
    if "value" in item:
        return expand(str(item["value"]), env)
    source = item.get("valueFrom") or {}
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        fields = {
            "metadata.namespace": pod.namespace, "metadata.name": pod.name, "metadata.uid": pod.uid,
            "spec.serviceAccountName": pod.service_account, "spec.nodeName": "", "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if label:
            return pod.labels.get(label.group(1), "")
        if path not in fields:
            raise HarnessError(f"env {item['name']}: fieldRef {path} is not supported by the harness")
        return fields[path]
    if "secretKeyRef" in source or "configMapKeyRef" in source:
        ref = source.get("secretKeyRef") or source["configMapKeyRef"]
        core = client.CoreV1Api(cp.api)
        if "secretKeyRef" in source:
            data = core.read_namespaced_secret(ref["name"], pod.namespace).data or {}
            return b64decode(data[ref["key"]]).decode()
        return str((core.read_namespaced_config_map(ref["name"], pod.namespace).data or {})[ref["key"]])
    raise HarnessError(f"env {item['name']}: {sorted(source)} is not supported by the harness")


def _materialize_volume(cp: ControlPlane, namespace: str, volume: Obj, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if "emptyDir" in volume:
        return
    if "secret" in volume or "configMap" in volume:
        core = client.CoreV1Api(cp.api)
        spec = volume.get("secret") or volume["configMap"]
        if "secret" in volume:
            raw = core.read_namespaced_secret(spec["secretName"], namespace).data or {}
            files = {k: b64decode(v) for k, v in raw.items()}
        else:
            cm = core.read_namespaced_config_map(spec["name"], namespace)
            files = {k: v.encode() for k, v in (cm.data or {}).items()}
        mode = int(spec.get("defaultMode", 0o644))
        items = spec.get("items")
        wanted = {i["key"]: (i["path"], int(i.get("mode", mode))) for i in items} if items else {
            k: (k, mode) for k in files}
        for key, (rel, file_mode) in wanted.items():
            target = where / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[key])
            target.chmod(file_mode)
        return
    raise HarnessError(f"volume {volume['name']}: only emptyDir, secret and configMap are supported "
                       f"by the harness, not {sorted(k for k in volume if k != 'name')}")


def _rewrite_paths(text: str, mounts: list[tuple[str, Path]]) -> str:
    # A mount path is rewritten where a path starts: at the start, after `=`, `,` or `unix://`.
    for mount_path, local in mounts:
        pattern = re.compile(r"(?:^|(?<==)|(?<=,)|(?<=unix://))" + re.escape(mount_path) + r"(?=/|$|,|\s)")
        text = pattern.sub(str(local).replace("\\", "\\\\"), text)
    return text


def _rewrite_port(arg: str, ports: Mapping[int, int]) -> str:
    flag, eq, value = arg.partition("=")
    if not eq:
        flag, value = "", arg
    m = _HOSTPORT.match(value)
    if m and int(m.group("port")) in ports:
        value = f"127.0.0.1:{ports[int(m.group('port'))]}"
    elif flag.endswith("-port") and value.isdigit() and int(value) in ports:
        value = str(ports[int(value)])
    return f"{flag}={value}" if eq else value


def local_pod(cp: ControlPlane, namespace: str, deployment_name: str, *,
              commands: Mapping[str, Path] | None = None, pod_root: Path | None = None) -> LocalPod:
    """Translate the Deployment's pod template into local processes-to-be (nothing started)."""
    apps = client.AppsV1Api(cp.api)
    deployment = plain(cp.api, apps.read_namespaced_deployment(deployment_name, namespace))
    spec = deployment["spec"]["template"]["spec"]
    pod_obj = find_pod(cp, namespace, deployment)
    identity = PodIdentity(
        namespace=namespace, name=pod_obj["metadata"]["name"], uid=pod_obj["metadata"]["uid"],
        service_account=spec.get("serviceAccountName") or "default",
        labels=pod_obj["metadata"].get("labels") or {},
    )
    pods_dir = cp.root / "pods"
    pods_dir.mkdir(exist_ok=True)
    # Short: a unix socket path must stay under 108 bytes.
    root = pod_root or pods_dir / f"p{len(list(pods_dir.iterdir()))}"
    root.mkdir(parents=True)
    kubeconfig = cp.service_account_kubeconfig(namespace, identity.service_account, root / "sa.kubeconfig",
                                               pod=(identity.name, identity.uid))
    volumes: dict[str, Path] = {}
    used = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    for volume in spec.get("volumes", []):
        if volume["name"] in used:
            where = root / volume["name"]
            _materialize_volume(cp, namespace, volume, where)
            volumes[volume["name"]] = where
    ports = {int(p["containerPort"]): cp.ports.take() for c in spec["containers"] for p in c.get("ports", [])}
    commands = project_commands() if commands is None else commands
    containers = {c["name"]: _container(c, identity, volumes, ports, kubeconfig, commands, cp)
                  for c in spec["containers"]}
    return LocalPod(identity=identity, root=root, kubeconfig=kubeconfig, volumes=volumes, ports=ports,
                    containers=containers, deployment=deployment)


def _container(c: Obj, pod: PodIdentity, volumes: Mapping[str, Path], ports: Mapping[int, int],
               kubeconfig: Path, commands: Mapping[str, Path], cp: ControlPlane) -> LocalContainer:
    env: dict[str, str] = {}
    for item in c.get("env", []):
        env[item["name"]] = _env_value(item, pod, env, cp)
    if c.get("envFrom"):
        raise HarnessError(f"container {c['name']}: envFrom is not supported by the harness")
    command = [expand(a, env) for a in c.get("command", [])]
    args = [expand(a, env) for a in c.get("args", [])]
    chart_argv = command + args
    changes: list[str] = []
    if command:
        binary = command[0]
        if binary not in commands:
            raise HarnessError(f"container {c['name']}: no local program for command {binary!r}")
        exe = commands[binary]
        argv = [str(exe), *command[1:], *args]
    else:
        binary = image_name(c["image"])
        found = k8s_bin(binary)
        if found is None:
            raise HarnessError(f"container {c['name']}: {binary} not found in {k8s_bin_dir()}")
        argv = [str(found), *args]
    changes.append(f"program {binary} -> {argv[0]}")
    mounts = sorted(((m["mountPath"].rstrip("/"), volumes[m["name"]] / m.get("subPath", ""))
                     for m in c.get("volumeMounts", [])), key=lambda m: -len(m[0]))
    new_argv = [argv[0]]
    for arg in argv[1:]:
        new = _rewrite_port(_rewrite_paths(arg, mounts), ports)
        if new != arg:
            changes.append(f"{arg} -> {new}")
        new_argv.append(new)
    for name, value in list(env.items()):
        new = _rewrite_paths(value, mounts)
        if new != value:
            changes.append(f"env {name}={value} -> {new}")
            env[name] = new
    if binary in KUBE_CLIENT_SIDECARS:
        new_argv.append(f"--kubeconfig={kubeconfig}")
        changes.append(f"added --kubeconfig={kubeconfig} (ServiceAccount {pod.service_account} token)")
    elif binary in PROJECT_COMMANDS:
        env["KUBECONFIG"] = str(kubeconfig)
        changes.append(f"env KUBECONFIG={kubeconfig} (ServiceAccount {pod.service_account} token)")
    return LocalContainer(name=c["name"], image=c["image"], binary=binary, argv=new_argv, env=env,
                          chart_argv=chart_argv, changes=changes, mounts=mounts, ports=ports)


def process_env(pod: LocalPod, container: LocalContainer) -> dict[str, str]:
    """A container's environment as a process: its own env, PATH, HOME in the pod directory
    (nothing of the test runner's environment leaks in, no ~/.kube/config)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(pod.root), "PYTHONUNBUFFERED": "1"}
    return {**base, **container.env}


def run_container(cp: ControlPlane, pod: LocalPod, name: str, *, argv: list[str] | None = None) -> Process:
    """Start one container of the pod as a local process (argv overrides the translated one)."""
    container = pod.containers[name]
    return cp.procs.start(f"{pod.root.name}-{name}", argv or container.argv, env=process_env(pod, container),
                          cwd=pod.root)


def local_exec(pod: LocalPod, commands: Mapping[str, Path] | None = None) -> ExecInput:
    """`kubectl exec` into a container of this pod as the harness runs it: the project command
    found locally, the container's environment, its paths and ports rewritten, in the pod's
    directory. (Exec through the API server needs a kubelet, which the harness does not run.)"""
    commands = project_commands() if commands is None else commands

    local = pod

    def run(namespace: str, pod: str, container: str, argv: Sequence[str],
            stdin: str | None = None) -> tuple[int, str]:
        if (namespace, pod) != (local.identity.namespace, local.identity.name):
            raise HarnessError(f"exec into {namespace}/{pod}: only {local.identity.name} runs here")
        c = local.containers[container]
        if argv[0] not in commands:
            raise HarnessError(f"exec {argv[0]!r}: not a project command")
        proc = subprocess.run([str(commands[argv[0]]), *c.local_args(list(argv[1:]))], env=process_env(local, c),
                              cwd=local.root, capture_output=True, text=True, timeout=300, check=False,
                              input=stdin)
        return proc.returncode, proc.stdout + proc.stderr

    return run


REJECTED_FLAG = re.compile(r"flag provided but not defined: -+([\w.-]+)|unknown flag: --?([\w.-]+)"
                           r"|unrecognized feature gate: ([\w.-]+)")


def rejected_flags(log: str) -> list[str]:
    """Flags (or feature gates) a Go sidecar refused at start."""
    return sorted({next(g for g in m.groups() if g) for m in REJECTED_FLAG.finditer(log)})
