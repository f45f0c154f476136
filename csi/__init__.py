"""zvolt CSI driver: Identity, Controller (talks to agents) and Node (NVMe/TCP attach, mount)."""

DRIVER_NAME = "csi.zvolt.io"
# Topology key reported by nodes and volumes; see csi/README.md.
TOPOLOGY_ZONE_KEY = "topology.csi.zvolt.io/zone"
DEFAULT_ZONE = "default"
