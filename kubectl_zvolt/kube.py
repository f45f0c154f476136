"""The plugin's only door to the Kubernetes API (the seam tests point at a fake server).

Objects travel as plain dicts (the JSON the API server speaks), so the rest of the plugin
never depends on the generated client models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.model import SNAPSHOT_GROUP, SNAPSHOT_VERSION

Obj = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """Where to talk, resolved like kubectl: --kubeconfig, --context, -n or the context's."""

    kubeconfig: str | None
    context: str | None
    namespace: str | None


class Exec(Protocol):
    """Runs a command in a pod's container; returns (exit status, output)."""

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str]) -> tuple[int, str]: ...


class ExecInput(Protocol):
    """Exec that also writes `stdin` (one line, e.g. keys that must not be in argv) to the command."""

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str],
                 stdin: str | None = None) -> tuple[int, str]: ...


class Session(Protocol):
    """An exec that talks: `first` goes to the command's stdin, then each line it prints on stdout
    goes to `on_line` as it comes, whose answer (if not None) goes back to its stdin as one line.
    Returns (exit status, what it printed on stderr)."""

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str], first: str,
                 on_line: Callable[[str], str | None]) -> tuple[int, str]: ...


class Kube:
    """Typed calls the plugin needs, over the official Python client."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    def connect(cls, target: Target) -> Kube:
        try:
            contexts, active = config.list_kube_config_contexts(config_file=target.kubeconfig)
        except config.ConfigException as e:
            raise PluginError(f"cannot read kubeconfig: {e}") from e
        chosen = active
        if target.context:
            matches = [c for c in contexts if c.get("name") == target.context]
            if not matches:
                raise PluginError(f"context {target.context!r} not found in kubeconfig")
            chosen = matches[0]
        namespace = target.namespace or (chosen or {}).get("context", {}).get("namespace") or "default"
        cfg = client.Configuration()
        try:
            config.load_kube_config(config_file=target.kubeconfig, context=target.context,
                                    client_configuration=cfg)
        except config.ConfigException as e:
            raise PluginError(f"cannot use kubeconfig: {e}") from e
        return cls(client.ApiClient(cfg), namespace)

    # --- reading -------------------------------------------------------------------

    def _plain(self, obj: Any) -> Obj:
        if isinstance(obj, dict):
            return obj
        result: Obj = self.api.sanitize_for_serialization(obj)
        return result

    def get_pvc(self, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return self._plain(self.core.read_namespaced_persistent_volume_claim(name, namespace or self.namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"reading PVC {name}") from e

    def get_pv(self, name: str) -> Obj | None:
        try:
            return self._plain(self.core.read_persistent_volume(name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"reading PersistentVolume {name}") from e

    def list_pvcs(self) -> list[Obj]:
        try:
            res = self._plain(self.core.list_namespaced_persistent_volume_claim(self.namespace))
        except ApiException as e:
            raise _api_error(e, "listing PVCs") from e
        return list(res.get("items") or [])

    def list_pods(self) -> list[Obj]:
        try:
            res = self._plain(self.core.list_namespaced_pod(self.namespace))
        except ApiException as e:
            raise _api_error(e, "listing pods") from e
        return list(res.get("items") or [])

    def get_storage_class(self, name: str) -> Obj | None:
        try:
            return self._plain(self.storage.read_storage_class(name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"reading StorageClass {name}") from e

    def list_storage_classes(self) -> list[Obj]:
        try:
            return list(self._plain(self.storage.list_storage_class()).get("items") or [])
        except ApiException as e:
            raise _api_error(e, "listing StorageClasses") from e

    def list_pvs(self) -> list[Obj]:
        try:
            return list(self._plain(self.core.list_persistent_volume()).get("items") or [])
        except ApiException as e:
            raise _api_error(e, "listing PersistentVolumes") from e

    def list_csinodes(self) -> list[Obj]:
        try:
            return list(self._plain(self.storage.list_csi_node()).get("items") or [])
        except ApiException as e:
            raise _api_error(e, "listing CSINodes") from e

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._plain(self.core.read_namespaced_secret(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"reading Secret {namespace}/{name}") from e

    def patch_secret_data(self, namespace: str, name: str, data: dict[str, str | None]) -> None:
        """Merge `data` (base64 values; None removes a key) into the Secret."""
        try:
            self.core.patch_namespaced_secret(name, namespace, {"data": data})
        except ApiException as e:
            raise _api_error(e, f"updating Secret {namespace}/{name}") from e

    def snapshot_api_present(self) -> bool:
        """Whether the VolumeSnapshot CRDs (snapshot.storage.k8s.io/v1) are installed."""
        try:
            groups = self._plain(client.ApisApi(self.api).get_api_versions())
        except ApiException as e:
            raise _api_error(e, "discovering API groups") from e
        for group in groups.get("groups") or []:
            if group.get("name") == SNAPSHOT_GROUP:
                return any(v.get("version") == SNAPSHOT_VERSION for v in group.get("versions") or [])
        return False

    def get_snapshot(self, name: str) -> Obj | None:
        try:
            res: Obj = self.custom.get_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name)
            return res
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(e, f"reading VolumeSnapshot {name}") from e

    def list_snapshots(self) -> list[Obj]:
        try:
            res: Obj = self.custom.list_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots")
        except ApiException as e:
            raise _api_error(e, "listing VolumeSnapshots") from e
        return list(res.get("items") or [])

    def list_snapshot_classes(self) -> list[Obj]:
        try:
            res: Obj = self.custom.list_cluster_custom_object(SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotclasses")
        except ApiException as e:
            raise _api_error(e, "listing VolumeSnapshotClasses") from e
        return list(res.get("items") or [])

    # --- writing -------------------------------------------------------------------

    def create_pvc(self, body: Obj) -> Obj:
        try:
            return self._plain(self.core.create_namespaced_persistent_volume_claim(self.namespace, body))
        except ApiException as e:
            raise _api_error(e, f"creating PVC {body['metadata']['name']}") from e

    def create_snapshot(self, body: Obj) -> Obj:
        try:
            res: Obj = self.custom.create_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", body)
            return res
        except ApiException as e:
            raise _api_error(e, f"creating VolumeSnapshot {body['metadata']['name']}") from e

    def delete_pvc(self, name: str) -> None:
        try:
            self.core.delete_namespaced_persistent_volume_claim(name, self.namespace)
        except ApiException as e:
            raise _api_error(e, f"deleting PVC {name}") from e

    def delete_snapshot(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name)
        except ApiException as e:
            raise _api_error(e, f"deleting VolumeSnapshot {name}") from e

    # --- waiting -------------------------------------------------------------------

    def wait_pvc(self, name: str, done: Callable[[Obj], bool], timeout: float) -> Obj:
        """Watch one PVC from the resourceVersion we read until `done` holds (no polling)."""
        return self._wait(
            lambda: self.get_pvc(name),
            self.core.list_namespaced_persistent_volume_claim,
            {"namespace": self.namespace},
            name, done, timeout, "PVC",
        )

    def wait_snapshot(self, name: str, done: Callable[[Obj], bool], timeout: float) -> Obj:
        return self._wait(
            lambda: self.get_snapshot(name),
            self.custom.list_namespaced_custom_object,
            {"group": SNAPSHOT_GROUP, "version": SNAPSHOT_VERSION, "namespace": self.namespace,
             "plural": "volumesnapshots"},
            name, done, timeout, "VolumeSnapshot",
        )

    def _wait(self, get: Callable[[], Obj | None], lister: Callable[..., Any],
              kwargs: dict[str, Any], name: str, done: Callable[[Obj], bool], timeout: float, kind: str) -> Obj:
        deadline = time.monotonic() + timeout
        while True:
            obj = get()
            if obj is None:
                raise PluginError(f"{kind} {name} disappeared while waiting for it")
            if done(obj):
                return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise PluginError(f"timed out after {timeout:g}s waiting for {kind} {name}")
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            w = watch.Watch()
            try:
                for event in w.stream(lister, **kwargs, field_selector=f"metadata.name={name}",
                                      resource_version=rv, timeout_seconds=max(1, int(left)),
                                      _request_timeout=left + 5):
                    cur = self._plain(event["object"])
                    if event["type"] == "DELETED":
                        raise PluginError(f"{kind} {name} was deleted while waiting for it")
                    if done(cur):
                        return cur
                    if time.monotonic() >= deadline:
                        break
            except ApiException as e:
                if e.status != 410:  # 410 Gone: our resourceVersion is too old; re-read.
                    raise _api_error(e, f"watching {kind} {name}") from e
            finally:
                w.stop()


def _api_error(e: ApiException, doing: str) -> PluginError:
    reason = e.reason or ""
    if e.status == 403:
        return PluginError(f"{doing}: forbidden by RBAC ({reason})")
    body = str(e.body or "")
    try:
        detail = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        detail = body[:200]
    return PluginError(f"{doing}: API error {e.status} {reason}{': ' + detail if detail else ''}")


TIMED_OUT = 124  # as timeout(1) says it


def finished(resp: Any, timeout: float, said: str) -> tuple[int, str]:
    """(exit status, output) of an exec stream whose reading loop ended. Still open: the command
    outlived `timeout` (a real kubelet lab found the client's status read raises then). Closed
    without a status: 1, saying so."""
    if resp.is_open():
        resp.close()
        return TIMED_OUT, said + f"\n(the command did not finish within {timeout:.0f}s)"
    try:
        code = resp.returncode
    except (TypeError, KeyError, AttributeError):
        return 1, said + "\n(the exec stream ended without an exit status)"
    return (code if code is not None else 1), said


def stream_exec(kube: Kube, timeout: float = 120.0, echo: Callable[[str], None] | None = None) -> ExecInput:
    """Exec through the API server (the client's websocket stream), like `kubectl exec`; its
    output is read for at most `timeout` seconds, and handed to `echo` as it comes (long runs)."""
    from kubernetes.stream import stream

    def run(namespace: str, pod: str, container: str, argv: Sequence[str],
            stdin: str | None = None) -> tuple[int, str]:
        resp = stream(kube.core.connect_get_namespaced_pod_exec, pod, namespace, container=container,
                      command=list(argv), stderr=True, stdin=stdin is not None, stdout=True, tty=False,
                      _preload_content=False)
        if stdin is not None:
            # One line, ended: the command reads a line (readline) and the stream never sends EOF,
            # so a request without its newline left the command waiting until the deadline (found
            # by the live-move relay on a real kubelet).
            resp.write_stdin(stdin.rstrip("\n") + "\n")
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while resp.is_open() and time.monotonic() < deadline:
            resp.update(timeout=1)
            for peek, read in ((resp.peek_stdout, resp.read_stdout), (resp.peek_stderr, resp.read_stderr)):
                if peek():
                    out.append(read())
                    if echo is not None:
                        echo(out[-1])
        return finished(resp, timeout, "".join(out))

    return run


def stream_session(kube: Kube, timeout: float = 3600.0) -> Session:
    """A Session through the API server (the client's websocket stream), like `kubectl exec -i`."""
    from kubernetes.stream import stream

    def run(namespace: str, pod: str, container: str, argv: Sequence[str], first: str,
            on_line: Callable[[str], str | None]) -> tuple[int, str]:
        resp = stream(kube.core.connect_get_namespaced_pod_exec, pod, namespace, container=container,
                      command=list(argv), stderr=True, stdin=True, stdout=True, tty=False, _preload_content=False)
        resp.write_stdin(first.rstrip("\n") + "\n")
        said: list[str] = []
        pending = ""
        deadline = time.monotonic() + timeout
        while resp.is_open() and time.monotonic() < deadline:
            resp.update(timeout=1)
            if resp.peek_stderr():
                said.append(resp.read_stderr())
            if resp.peek_stdout():
                pending += resp.read_stdout()
                *lines, pending = pending.split("\n")
                for line in lines:
                    answer = on_line(line)
                    if answer is not None:
                        resp.write_stdin(answer.rstrip("\n") + "\n")
        if pending:
            on_line(pending)
        return finished(resp, timeout, "".join(said))

    return run
