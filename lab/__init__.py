"""zvolt-lab: the real kernel stack (ZFS, nvmet, NVMe/TCP) in a qemu guest, for tests."""
