"""zvolt-bench: ratios of zvolt's control and data path against bare ZFS / local I/O, measured in one run."""
