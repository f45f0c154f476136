"""The test control plane's "cluster" egress: an HTTP CONNECT proxy on a unix socket that
kube-apiserver dials for everything it opens towards nodes and pods (kubelet exec, logs,
port-forward), configured by its --egress-selector-config-file.

A lab node's address (10.0.2.15, qemu's user network) does not exist on this machine, so the
API server cannot dial its kubelet. The proxy maps each CONNECT target to a local address read
from a routes file at connect time (JSON {"10.0.2.15:10250": "127.0.0.1:PORT"}, written by
ControlPlane.route when a node joins); a target without a route is refused (502), so nothing
else is ever reached. Run by path with the standard library only.

    python egress_proxy.py SOCKET ROUTES_FILE
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from pathlib import Path

CONNECT_TIMEOUT = 10.0
CHUNK = 65536
MAX_HEADER = 8192


def lookup(routes_file: Path, target: str) -> tuple[str, int] | None:
    try:
        routes = json.loads(routes_file.read_text())
    except (OSError, ValueError):
        return None
    local = routes.get(target) if isinstance(routes, dict) else None
    if not isinstance(local, str):
        return None
    host, _, port = local.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def read_request(conn: socket.socket) -> str:
    """The CONNECT target of the request head, or "" when it is not a CONNECT."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(1024)
        if not data or len(head) > MAX_HEADER:
            return ""
        head += data
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    return words[1] if len(words) == 3 and words[0] == "CONNECT" else ""


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def serve_one(conn: socket.socket, routes_file: Path) -> None:
    with conn:
        target = read_request(conn)
        local = lookup(routes_file, target) if target else None
        if local is None:
            print(f"egress: refused CONNECT {target or '(not a CONNECT)'}: no route", flush=True)
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            return
        try:
            upstream = socket.create_connection(local, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            print(f"egress: CONNECT {target} -> {local[0]}:{local[1]} failed: {exc}", flush=True)
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            return
        with upstream:
            upstream.settimeout(None)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
            back.start()
            pump(conn, upstream)
            back.join()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, routes_file = argv[1], Path(argv[2])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(64)
    print(f"egress: listening on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn, routes_file), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
