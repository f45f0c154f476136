"""A writer that checks its own data, run in a lab guest while a volume moves under it.

`python livewriter.py DEVICE BLOCKS STOP_FILE OUT_JSON`: writes 4 KiB blocks 0..BLOCKS-1 round
and round with O_DIRECT, each block holding its index and generation; fsync every 64 writes.
It records every failed write and the longest time between two completed writes (the pause the
application saw). When STOP_FILE appears it fsyncs, reads every block back through the same
device and counts those that do not hold their last acknowledged generation. Standard library
only: it runs under the guest's interpreter.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
import time

BLOCK = 4096


def pattern(index: int, generation: int) -> bytes:
    head = struct.pack("<QQ", index, generation)
    return (head + hashlib.sha256(head).digest() * 128)[:BLOCK]


def main(device: str, blocks: int, stop_file: str, out: str) -> int:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    acked = [0] * blocks
    errors: list[list[object]] = []
    writes = 0
    start = last = time.monotonic()
    worst, worst_at = 0.0, 0.0
    while not os.path.exists(stop_file):
        index, generation = writes % blocks, writes // blocks + 1
        buf.seek(0)
        buf.write(pattern(index, generation))
        try:
            os.pwrite(fd, buf, index * BLOCK)
            if (writes + 1) % 64 == 0:
                os.fsync(fd)
        except OSError as exc:
            errors.append([round(time.monotonic() - start, 3), str(exc)])
            time.sleep(0.05)
            continue
        now = time.monotonic()
        if now - last > worst:
            worst, worst_at = now - last, last - start
        last = now
        acked[index] = generation
        writes += 1
    os.fsync(fd)
    bad = []
    for index in range(blocks):
        if not acked[index]:
            continue
        os.preadv(fd, [buf], index * BLOCK)
        if buf[:] != pattern(index, acked[index]):
            bad.append(index)
    os.close(fd)
    with open(out, "w") as f:
        json.dump({"writes": writes, "seconds": round(time.monotonic() - start, 3), "errors": errors[:10],
                   "error_count": len(errors), "longest_pause_s": round(worst, 3),
                   "longest_pause_at_s": round(worst_at, 3), "bad_blocks": bad[:10], "bad_count": len(bad),
                   "verified_blocks": sum(1 for g in acked if g)}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
