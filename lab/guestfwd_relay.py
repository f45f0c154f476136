"""The host end of a qemu guestfwd: relays one guest connection (our stdin/stdout, a socket
qemu hands over) to 127.0.0.1:PORT, PORT read from a file at connect time.

Reading the port when the guest connects lets a guest boot before the service it reaches
(the test control plane picks a free port later, and a running guest is reused across test
sessions). Run by path with the standard library only: qemu starts it with no PYTHONPATH.
qemu also makes the socket our stderr, so nothing is ever written there: failures go to the
log file named on the command line.

    python guestfwd_relay.py PORT_FILE LOG_FILE
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

CONNECT_TIMEOUT = 10.0
CHUNK = 65536


def read_port(port_file: Path) -> int:
    port = int(port_file.read_text().strip())
    if not 1 <= port <= 65535:
        raise ValueError(f"{port_file}: port {port} is out of range")
    return port


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then pass the EOF on (half-close) so the other direction can finish."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def relay(guest: socket.socket, port_file: Path) -> None:
    upstream = socket.create_connection(("127.0.0.1", read_port(port_file)), timeout=CONNECT_TIMEOUT)
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, guest), daemon=True)
    back.start()
    pump(guest, upstream)
    back.join()
    upstream.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        return 2
    port_file, log_file = Path(argv[1]), Path(argv[2])
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    guest = socket.socket(fileno=os.dup(0))
    try:
        relay(guest, port_file)
    except (OSError, ValueError) as exc:
        with log_file.open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} guestfwd relay via {port_file}: {exc}\n")
        return 1
    finally:
        guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
