"""An in-process fake Kubernetes API server for the kubectl-zvolt tests, and its own tests.

It speaks real HTTP/JSON on 127.0.0.1 with the semantics the plugin relies on: create
(409 on a duplicate), get (404), list with label and field selectors, delete, a global
resourceVersion that every write bumps, and watch streams that replay events newer than
the given resourceVersion and then block for new ones (410 Gone for a compacted one). It
also plays the cluster's controllers the plugin waits on: external-provisioner binds a
zvolt PVC (unless WaitForFirstConsumer holds it without a selected node) and the
snapshot-controller marks a VolumeSnapshot ready, each after a configurable delay.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

Obj = dict[str, Any]
DRIVER = "csi.zvolt.io"

# resource -> (path prefix, namespaced, kind)
RESOURCES: dict[str, tuple[str, bool, str]] = {
    "persistentvolumeclaims": ("/api/v1", True, "PersistentVolumeClaim"),
    "pods": ("/api/v1", True, "Pod"),
    "storageclasses": ("/apis/storage.k8s.io/v1", False, "StorageClass"),
    "volumesnapshots": ("/apis/snapshot.storage.k8s.io/v1", True, "VolumeSnapshot"),
    "volumesnapshotclasses": ("/apis/snapshot.storage.k8s.io/v1", False, "VolumeSnapshotClass"),
}
API_VERSION = {
    "persistentvolumeclaims": "v1",
    "pods": "v1",
    "storageclasses": "storage.k8s.io/v1",
    "volumesnapshots": "snapshot.storage.k8s.io/v1",
    "volumesnapshotclasses": "snapshot.storage.k8s.io/v1",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def match_labels(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector: k=v, k==v, k!=v, k in (a,b), k notin (a,b), k, !k."""
    if not selector:
        return True
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = key in labels and labels[key] in vals
            if (op == "in") != inside:
                return False
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            key, op, val = m.groups()
            if (op == "!=") == (labels.get(key) == val):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_fields(selector: str, obj: Obj) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, op, val = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term).groups()  # type: ignore[union-attr]
        cur: Any = obj
        for part in key.split("."):
            cur = (cur or {}).get(part) if isinstance(cur, dict) else None
        if (op == "!=") == (str(cur) == val):
            return False
    return True


@dataclass
class Event:
    rv: int
    type: str
    resource: str
    namespace: str
    obj: Obj


@dataclass
class FakeKube:
    """State plus behaviour; `serve()` puts it on an HTTP port."""

    snapshot_api: bool = True
    bind_delay: float = 0.05
    snapshot_delay: float = 0.05
    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    rv: int = 100
    compacted_below: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    timers: list[threading.Timer] = field(default_factory=list)
    # kubelet's exec: (namespace, pod, container, argv) -> (exit status, output)
    exec_handler: Callable[[str, str, str, list[str]], tuple[int, str]] = lambda ns, pod, c, argv: (0, "")
    execs: list[tuple[str, str, str, list[str]]] = field(default_factory=list)

    # --- store -----------------------------------------------------------------------

    def _bump(self, type_: str, resource: str, ns: str, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append(Event(self.rv, type_, resource, ns, copy.deepcopy(obj)))
        self.cond.notify_all()

    def add(self, resource: str, obj: Obj, *, react: bool = True) -> Obj:
        """Create an object as the API server would (or 409 via KeyError for a duplicate)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            ns = meta.get("namespace", "default") if RESOURCES[resource][1] else ""
            if RESOURCES[resource][1]:
                meta["namespace"] = ns
            key = (resource, ns, meta["name"])
            if key in self.objects:
                raise KeyError(meta["name"])
            obj["apiVersion"] = API_VERSION[resource]
            obj["kind"] = RESOURCES[resource][2]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            if resource == "persistentvolumeclaims":
                obj.setdefault("status", {}).setdefault("phase", "Pending")
            self.objects[key] = obj
            self._bump("ADDED", resource, ns, obj)
            result = copy.deepcopy(obj)
        if react:
            self._react(resource, ns, meta["name"])
        return result

    def update(self, resource: str, ns: str, name: str, fn: Callable[[Obj], None]) -> Obj:
        with self.cond:
            obj = self.objects[(resource, ns, name)]
            fn(obj)
            self._bump("MODIFIED", resource, ns, obj)
            return copy.deepcopy(obj)

    def remove(self, resource: str, ns: str, name: str) -> Obj:
        with self.cond:
            obj = self.objects.pop((resource, ns, name))
            self._bump("DELETED", resource, ns, obj)
            return copy.deepcopy(obj)

    def get(self, resource: str, ns: str, name: str) -> Obj | None:
        with self.cond:
            obj = self.objects.get((resource, ns, name))
            return copy.deepcopy(obj) if obj else None

    def list(self, resource: str, ns: str | None, labels: str = "", fields: str = "") -> list[Obj]:
        with self.cond:
            return [copy.deepcopy(o) for (r, n, _), o in sorted(self.objects.items())
                    if r == resource and (ns is None or n == ns)
                    and match_labels(labels, (o["metadata"].get("labels") or {})) and match_fields(fields, o)]

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion get 410 Gone."""
        with self.cond:
            self.compacted_below = self.rv

    # --- the cluster's controllers -------------------------------------------------------

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        t = threading.Timer(delay, fn)
        t.daemon = True
        self.timers.append(t)
        t.start()

    def _react(self, resource: str, ns: str, name: str) -> None:
        if resource == "persistentvolumeclaims":
            self._maybe_bind(ns, name)
        elif resource == "pods":
            self._schedule(ns, name)
        elif resource == "volumesnapshots":
            self._later(self.snapshot_delay, lambda: self._ready_snapshot(ns, name))

    def _schedule(self, ns: str, name: str) -> None:
        """Scheduler + kubelet: pick the pod's node for its WaitForFirstConsumer claims
        (the selected-node annotation the provisioner acts on) and mark the pod Running."""
        pod = self.get("pods", ns, name)
        if pod is None:
            return
        node = pod["spec"].setdefault("nodeName", "worker-1")
        for vol in pod["spec"].get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            cur = self.get("persistentvolumeclaims", ns, claim or "")
            if cur is None or (cur.get("status") or {}).get("phase") == "Bound":
                continue
            annotations = cur["metadata"].get("annotations") or {}
            if "volume.kubernetes.io/selected-node" not in annotations:
                self.update("persistentvolumeclaims", ns, claim or "", lambda o: o["metadata"].setdefault(
                    "annotations", {}).update({"volume.kubernetes.io/selected-node": node}))
                self._maybe_bind(ns, claim or "")

        def run(o: Obj) -> None:
            o["spec"]["nodeName"] = node
            o["status"] = {"phase": "Running"}
        if (pod.get("status") or {}).get("phase") != "Running":
            self.update("pods", ns, name, run)

    def _maybe_bind(self, ns: str, name: str) -> None:
        pvc = self.get("persistentvolumeclaims", ns, name)
        if pvc is None:
            return
        sc = self.get("storageclasses", "", pvc["spec"].get("storageClassName") or "")
        if not sc or sc.get("provisioner") != DRIVER:
            return
        annotations = pvc["metadata"].get("annotations") or {}
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and \
                "volume.kubernetes.io/selected-node" not in annotations:
            return  # the real provisioner waits for the scheduler to pick a node

        def bind() -> None:
            def fn(o: Obj) -> None:
                o["spec"]["volumeName"] = f"pvc-{o['metadata']['uid']}"
                o["status"] = {"phase": "Bound", "accessModes": o["spec"].get("accessModes"),
                               "capacity": {"storage": o["spec"]["resources"]["requests"]["storage"]}}
            if self.get("persistentvolumeclaims", ns, name) is not None:
                self.update("persistentvolumeclaims", ns, name, fn)

        self._later(self.bind_delay, bind)

    def _ready_snapshot(self, ns: str, name: str) -> None:
        snap = self.get("volumesnapshots", ns, name)
        if snap is None:
            return
        src = self.get("persistentvolumeclaims", ns, snap["spec"]["source"].get("persistentVolumeClaimName", ""))

        def fn(o: Obj) -> None:
            if src is None:
                o["status"] = {"readyToUse": False, "error": {"message": "source PVC not found"}}
            else:
                size = (src.get("status") or {}).get("capacity", {}).get("storage") or \
                    src["spec"]["resources"]["requests"]["storage"]
                o["status"] = {"readyToUse": True, "restoreSize": size, "creationTime": _now(),
                               "boundVolumeSnapshotContentName": f"snapcontent-{o['metadata']['uid']}"}
        self.update("volumesnapshots", ns, name, fn)

    # --- HTTP --------------------------------------------------------------------------

    @staticmethod
    def status(code: int, reason: str, message: str) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    def route(self, path: str) -> tuple[str, str | None, str | None] | None:
        """(resource, namespace, name) of a path, or None."""
        for resource, (prefix, namespaced, _) in RESOURCES.items():
            if resource.startswith("volumesnapshot") and not self.snapshot_api:
                continue
            if namespaced:
                m = re.fullmatch(re.escape(prefix) + rf"(?:/namespaces/([^/]+))?/{resource}(?:/([^/]+))?", path)
                if m:
                    return resource, m.group(1), m.group(2)
            else:
                m = re.fullmatch(re.escape(prefix) + rf"/{resource}(?:/([^/]+))?", path)
                if m:
                    return resource, "", m.group(1)
        return None

    def api_groups(self) -> Obj:
        groups = [{"name": "storage.k8s.io", "versions": [{"groupVersion": "storage.k8s.io/v1", "version": "v1"}],
                   "preferredVersion": {"groupVersion": "storage.k8s.io/v1", "version": "v1"}}]
        if self.snapshot_api:
            groups.append({"name": "snapshot.storage.k8s.io",
                           "versions": [{"groupVersion": "snapshot.storage.k8s.io/v1", "version": "v1"}],
                           "preferredVersion": {"groupVersion": "snapshot.storage.k8s.io/v1", "version": "v1"}})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def resource_list(self, path: str) -> Obj | None:
        """APIResourceList discovery (what kubectl reads to map kinds to paths)."""
        found = [(r, ns, kind) for r, (prefix, ns, kind) in RESOURCES.items()
                 if prefix == path and (self.snapshot_api or not r.startswith("volumesnapshot"))]
        if not found:
            return None
        short = {"persistentvolumeclaims": ["pvc"], "pods": ["po"], "storageclasses": ["sc"],
                 "volumesnapshots": ["vs"], "volumesnapshotclasses": ["vsclass"]}
        group_version = path.removeprefix("/apis/").removeprefix("/api/")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                "resources": [{"name": r, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                               "shortNames": short[r], "verbs": ["create", "delete", "get", "list", "watch"]}
                              for r, ns, kind in found]}

    def watch_events(self, resource: str, ns: str | None, since: int, labels: str, fields: str,
                     timeout: float) -> Iterator[Obj]:
        deadline = time.monotonic() + timeout
        sent = since
        while True:
            with self.cond:
                if since < self.compacted_below:
                    yield {"type": "ERROR", "object": self.status(410, "Expired", "too old resource version")}
                    return
                pending = [e for e in self.events if e.rv > sent and e.resource == resource
                           and (ns is None or e.namespace == ns)]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self.cond.wait(min(left, 0.5))
                    continue
            for e in pending:
                sent = e.rv
                if match_labels(labels, e.obj["metadata"].get("labels") or {}) and match_fields(fields, e.obj):
                    yield {"type": e.type, "object": e.obj}

    def serve(self) -> Server:
        return Server(self)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKube

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Obj:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}") if n else {}

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        url = url._replace(path=url.path.rstrip("/") or "/")
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        fake = self.fake
        fake.requests.append((method, self.path))
        if method == "GET" and url.path == "/apis":
            return self._send(200, fake.api_groups())
        if method == "GET" and url.path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if method == "GET" and (listing := fake.resource_list(url.path)) is not None:
            return self._send(200, listing)
        if method == "GET" and url.path == "/version":
            return self._send(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"})
        if method == "GET" and (m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/exec", url.path)):
            return self._exec(m.group(1), m.group(2), parse_qs(url.query))
        r = fake.route(url.path)
        if r is None:
            return self._send(404, fake.status(404, "NotFound", "the server could not find the requested resource"))
        resource, ns, name = r
        kind = RESOURCES[resource][2]
        if method == "GET" and name is None:
            if q.get("watch") in {"true", "1"}:
                return self._watch(resource, ns, q)
            with fake.cond:
                items = fake.list(resource, ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
                rv = fake.rv
            return self._send(200, {"kind": f"{kind}List", "apiVersion": API_VERSION[resource],
                                    "metadata": {"resourceVersion": str(rv)}, "items": items})
        if method == "GET":
            obj = fake.get(resource, ns or "", name or "")
            if obj is None:
                return self._send(404, fake.status(404, "NotFound", f'{resource} "{name}" not found'))
            return self._send(200, obj)
        if method == "POST" and name is None:
            body = self._body()
            body.setdefault("metadata", {})
            if ns:
                body["metadata"]["namespace"] = ns
            if not body["metadata"].get("name"):
                return self._send(422, fake.status(422, "Invalid", "metadata.name: Required value"))
            try:
                return self._send(201, fake.add(resource, body))
            except KeyError:
                return self._send(409, fake.status(409, "AlreadyExists",
                                                   f'{resource} "{body["metadata"]["name"]}" already exists'))
        if method == "DELETE" and name:
            try:
                obj = fake.remove(resource, ns or "", name)
            except KeyError:
                return self._send(404, fake.status(404, "NotFound", f'{resource} "{name}" not found'))
            return self._send(200, obj)
        return self._send(405, fake.status(405, "MethodNotAllowed", f"{method} not supported here"))

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 1 << 16:
            head += bytes([126]) + n.to_bytes(2, "big")
        else:
            head += bytes([127]) + n.to_bytes(8, "big")
        return head + payload

    def _exec(self, ns: str, pod_name: str, q: dict[str, list[str]]) -> None:
        """Pod exec over a websocket (channel protocol v4, as the API server relays kubelet):
        stdout on channel 1, the exit status as a Status on channel 3, then close."""
        fake = self.fake
        pod = fake.get("pods", ns, pod_name)
        if pod is None:
            return self._send(404, fake.status(404, "NotFound", f'pods "{pod_name}" not found'))
        if (self.headers.get("Upgrade") or "").lower() != "websocket":
            return self._send(400, fake.status(400, "BadRequest", "exec needs a websocket upgrade"))
        container = (q.get("container") or [pod["spec"]["containers"][0]["name"]])[0]
        argv = q.get("command") or []
        fake.execs.append((ns, pod_name, container, argv))
        code, output = fake.exec_handler(ns, pod_name, container, argv)
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        if code == 0:
            status: Obj = {"metadata": {}, "status": "Success"}
        else:
            status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                      "message": f"command terminated with non-zero exit code: exit status {code}",
                      "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        frames = b""
        if output:
            frames += self._frame(0x2, b"\x01" + output.encode())
        frames += self._frame(0x2, b"\x03" + json.dumps(status).encode())
        frames += self._frame(0x8, (1000).to_bytes(2, "big"))
        self.wfile.write(frames)
        self.wfile.flush()
        self.close_connection = True

    def _watch(self, resource: str, ns: str | None, q: dict[str, str]) -> None:
        fake = self.fake
        since = int(q.get("resourceVersion") or fake.rv)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for ev in fake.watch_events(resource, ns, since, q.get("labelSelector", ""),
                                        q.get("fieldSelector", ""), float(q.get("timeoutSeconds") or 30)):
                line = json.dumps(ev).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class Server:
    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        handler = type("BoundHandler", (Handler,), {"fake": fake})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "db") -> Path:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}},
                {"name": "other", "context": {"cluster": "fake", "user": "fake", "namespace": "other"}},
            ],
        }
        path.write_text(json.dumps(cfg))
        return path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self.fake.timers:
            t.cancel()


# --- fixtures shared by the plugin tests ---------------------------------------------------

def zvolt_cluster(fake: FakeKube, *, wffc: bool = False) -> None:
    """Storage classes and snapshot class as the chart installs them."""
    mode = "WaitForFirstConsumer" if wffc else "Immediate"
    for name, bs in (("zvolt", "16K"), ("zvolt-postgres", "8K")):
        fake.add("storageclasses", {"metadata": {"name": name}, "provisioner": DRIVER,
                                    "parameters": {"volblocksize": bs, "compression": "lz4"},
                                    "volumeBindingMode": mode, "allowVolumeExpansion": True})
    fake.add("storageclasses", {"metadata": {"name": "standard"}, "provisioner": "rancher.io/local-path",
                                "volumeBindingMode": "Immediate"})
    if fake.snapshot_api:
        fake.add("volumesnapshotclasses", {"metadata": {"name": "zvolt", "annotations": {
            "snapshot.storage.kubernetes.io/is-default-class": "true"}}, "driver": DRIVER, "deletionPolicy": "Delete"})


def pvc(name: str, sc: str = "zvolt-postgres", size: str = "10Gi", ns: str = "db", bound: bool = True) -> Obj:
    obj: Obj = {"metadata": {"name": name, "namespace": ns, "labels": {"app": "pg"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": sc, "volumeMode": "Filesystem",
                         "resources": {"requests": {"storage": size}}}}
    if bound:
        obj["status"] = {"phase": "Bound", "capacity": {"storage": size}}
        obj["spec"]["volumeName"] = f"pv-{name}"
    return obj


def postgres_pod(name: str, claim: str, node: str = "worker-1", ns: str = "db") -> Obj:
    return {"metadata": {"name": name, "namespace": ns, "labels": {"app": "pg"}},
            "spec": {"nodeName": node,
                     "containers": [
                         {"name": "metrics", "image": "exporter:1", "volumeMounts": []},
                         {"name": "postgres", "image": "postgres:17",
                          "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": "Running"}}


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    yield FakeKube()


@pytest.fixture
def server(fake: FakeKube) -> Iterator[Server]:
    srv = fake.serve()
    try:
        yield srv
    finally:
        srv.close()


# --- tests of the fake itself: the semantics the plugin tests lean on ---------------------

def _get(url: str) -> tuple[int, Obj]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: Obj) -> tuple[int, Obj]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_label_selectors() -> None:
    labels = {"app": "pg", "tier": "db"}
    assert match_labels("app=pg", labels)
    assert match_labels("app==pg,tier=db", labels)
    assert not match_labels("app=redis", labels)
    assert match_labels("app!=redis", labels)
    assert not match_labels("app!=pg", labels)
    assert match_labels("tier in (db, cache)", labels)
    assert not match_labels("tier notin (db)", labels)
    assert match_labels("app", labels) and not match_labels("!app", labels)
    assert match_labels("!missing", labels) and not match_labels("missing", labels)


def test_create_get_conflict_and_resource_versions(server: Server) -> None:
    base = f"{server.url}/api/v1/namespaces/db/persistentvolumeclaims"
    code, created = _post(base, pvc("a", bound=False))
    assert code == 201
    rv1 = int(created["metadata"]["resourceVersion"])
    code, again = _post(base, pvc("a", bound=False))
    assert code == 409 and again["reason"] == "AlreadyExists"
    code, second = _post(base, pvc("b", bound=False))
    assert int(second["metadata"]["resourceVersion"]) > rv1
    code, got = _get(f"{base}/a")
    assert code == 200 and got["metadata"]["uid"] == created["metadata"]["uid"]
    code, missing = _get(f"{base}/nope")
    assert code == 404 and missing["reason"] == "NotFound"
    code, lst = _get(f"{base}?labelSelector=app%3Dpg")
    assert [i["metadata"]["name"] for i in lst["items"]] == ["a", "b"]
    code, lst = _get(f"{base}?fieldSelector=metadata.name%3Db")
    assert [i["metadata"]["name"] for i in lst["items"]] == ["b"]
    assert int(lst["metadata"]["resourceVersion"]) >= int(second["metadata"]["resourceVersion"])


def test_watch_replays_from_resource_version_then_streams(server: Server, fake: FakeKube) -> None:
    zvolt_cluster(fake)
    start = fake.rv
    fake.add("persistentvolumeclaims", pvc("w", bound=False))  # binds after bind_delay
    url = (f"{server.url}/api/v1/namespaces/db/persistentvolumeclaims?watch=true"
           f"&resourceVersion={start}&fieldSelector=metadata.name%3Dw&timeoutSeconds=2")
    seen = []
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r:
            ev = json.loads(line)
            seen.append((ev["type"], ev["object"]["status"].get("phase")))
            if ev["object"]["status"].get("phase") == "Bound":
                break
    assert seen == [("ADDED", "Pending"), ("MODIFIED", "Bound")]


def test_watch_from_compacted_version_is_gone(server: Server, fake: FakeKube) -> None:
    old = fake.rv
    fake.add("persistentvolumeclaims", pvc("x"))
    fake.compact()
    url = f"{server.url}/api/v1/namespaces/db/persistentvolumeclaims?watch=true&resourceVersion={old}"
    with urllib.request.urlopen(url, timeout=5) as r:
        ev = json.loads(r.readline())
    assert ev["type"] == "ERROR" and ev["object"]["code"] == 410


def test_wait_for_first_consumer_needs_a_selected_node(fake: FakeKube) -> None:
    zvolt_cluster(fake, wffc=True)
    fake.add("persistentvolumeclaims", pvc("held", bound=False))
    held_annotated = pvc("go", bound=False)
    held_annotated["metadata"]["annotations"] = {"volume.kubernetes.io/selected-node": "worker-1"}
    fake.add("persistentvolumeclaims", held_annotated)
    time.sleep(fake.bind_delay * 6)
    assert fake.get("persistentvolumeclaims", "db", "held")["status"]["phase"] == "Pending"  # type: ignore[index]
    assert fake.get("persistentvolumeclaims", "db", "go")["status"]["phase"] == "Bound"  # type: ignore[index]


def test_snapshot_api_can_be_absent(server: Server, fake: FakeKube) -> None:
    fake.snapshot_api = False
    code, groups = _get(f"{server.url}/apis")
    assert "snapshot.storage.k8s.io" not in [g["name"] for g in groups["groups"]]
    code, _ = _get(f"{server.url}/apis/snapshot.storage.k8s.io/v1/namespaces/db/volumesnapshots")
    assert code == 404
