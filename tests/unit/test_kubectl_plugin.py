"""kubectl-zvolt against the in-process fake API server, through the real Kubernetes client."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

# A sibling test module (pytest puts tests/unit on sys.path; mypy's explicit package bases
# cannot see it, so its names are untyped here).
from test_kubectl_fakeapi import (  # type: ignore[import-not-found,unused-ignore]
    FakeKube,
    Server,
    postgres_pod,
    pvc,
    zvolt_cluster,
)

from kubectl_zvolt import cli, tree
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.format import age
from kubectl_zvolt.model import Snapshot, Volume


class Recorder:
    """Stands in for exec-into-pod; records what would run where."""

    def __init__(self, code: int = 0, output: str = "") -> None:
        self.calls: list[tuple[str, str, str, list[str]]] = []
        self.code = code
        self.output = output

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append((namespace, pod, container, list(argv)))
        return self.code, self.output


@pytest.fixture
def fake() -> FakeKube:
    return FakeKube()


@pytest.fixture
def server(fake: FakeKube) -> Iterator[Server]:
    srv = fake.serve()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def kcfg(server: Server, tmp_path: Path) -> str:
    return str(server.kubeconfig(tmp_path / "kubeconfig"))


def zv(kcfg: str, *args: str, execute: Recorder | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        code = cli.run(["--help"] if not args else [args[0], "--kubeconfig", kcfg, *args[1:]],
                       execute=execute or Recorder(), out=out)
    except PluginError as e:
        return 1, out.getvalue(), str(e)
    return code, out.getvalue(), err.getvalue()


def test_branch_clones_a_pvc_and_waits_until_bound(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main", size="20Gi"))
    fake.bind_delay = 0.3
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-dev", "--wait")
    assert code == 0
    assert out.startswith("persistentvolumeclaim/pg-dev bound in ")
    elapsed = float(out.split(" in ")[1].split("s")[0])
    assert 0.3 <= elapsed < 5, out  # it really waited for the provisioner
    new = fake.get("persistentvolumeclaims", "db", "pg-dev")
    assert new is not None
    assert new["spec"]["dataSource"] == {"kind": "PersistentVolumeClaim", "name": "pg-main"}
    assert new["spec"]["storageClassName"] == "zvolt-postgres"
    assert new["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert new["metadata"]["annotations"]["zvolt.io/branch-of"] == "pg-main"
    assert new["status"]["phase"] == "Bound"
    # Waiting used a watch from the object's resourceVersion, not a polling loop.
    watches = [p for m, p in fake.requests if "watch=True" in p or "watch=true" in p]
    assert watches and all("resourceVersion=" in p and "fieldSelector=metadata.name" in p for p in watches)


def test_branch_without_wait_returns_pending(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.bind_delay = 5
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-dev")
    assert code == 0 and out.startswith("persistentvolumeclaim/pg-dev pending in ")


def test_branch_from_snapshot_uses_restore_size(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main", size="10Gi"))
    assert zv(kcfg, "snapshot", "pg-main", "nightly", "--wait")[0] == 0
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-test", "--from-snapshot", "nightly", "--wait")
    assert code == 0, out
    new = fake.get("persistentvolumeclaims", "db", "pg-test")
    assert new is not None
    assert new["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                         "name": "nightly"}
    assert new["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert new["metadata"]["annotations"]["zvolt.io/branch-snapshot"] == "nightly"


def test_branch_from_a_snapshot_of_another_pvc_is_refused(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("a"))
    fake.add("persistentvolumeclaims", pvc("b"))
    assert zv(kcfg, "snapshot", "b", "snap-b", "--wait")[0] == 0
    code, _, err = zv(kcfg, "branch", "a", "c", "--from-snapshot", "snap-b")
    assert code == 1 and "is of PVC 'b', not 'a'" in err
    assert fake.get("persistentvolumeclaims", "db", "c") is None


def test_checkpoint_runs_in_the_postgres_container_before_the_clone(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.add("pods", postgres_pod("pg-0", "pg-main"))
    rec = Recorder(output="")
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-dev", "--checkpoint", "--wait", execute=rec)
    assert code == 0
    assert rec.calls == [("db", "pg-0", "postgres", ["psql", "-X", "-q", "-U", "postgres", "-d", "postgres",
                                                      "-c", "CHECKPOINT"])]
    assert "checkpointed pg-0/postgres" in out
    assert "zvolt.io/checkpoint" in fake.get("persistentvolumeclaims", "db", "pg-dev")["metadata"]["annotations"]  # type: ignore[index]


def test_failed_checkpoint_creates_nothing(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.add("pods", postgres_pod("pg-0", "pg-main"))
    code, _, err = zv(kcfg, "branch", "pg-main", "pg-dev", "--checkpoint",
                      execute=Recorder(code=2, output='psql: error: role "postgres" does not exist'))
    assert code == 1 and "CHECKPOINT in pod pg-0 (container postgres) failed with status 2" in err
    assert 'role "postgres" does not exist' in err
    assert fake.get("persistentvolumeclaims", "db", "pg-dev") is None


def test_checkpoint_without_a_running_pod_is_a_clear_error(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    code, _, err = zv(kcfg, "branch", "pg-main", "pg-dev", "--checkpoint")
    assert code == 1 and "no running pod mounts PVC 'pg-main'" in err


def test_wait_for_first_consumer_branch_is_pinned_to_the_source_pods_node(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake, wffc=True)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.add("pods", postgres_pod("pg-0", "pg-main", node="worker-7"))
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-dev", "--wait")
    assert code == 0 and "bound" in out
    new = fake.get("persistentvolumeclaims", "db", "pg-dev")
    assert new["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "worker-7"  # type: ignore[index]


def test_wait_for_first_consumer_without_a_pod_does_not_hang(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake, wffc=True)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    code, out, _ = zv(kcfg, "branch", "pg-main", "pg-dev", "--wait", "--timeout", "3")
    assert code == 0
    assert "pending" in out and "WaitForFirstConsumer" in out


def test_wait_times_out_with_a_message(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.bind_delay = 30
    code, _, err = zv(kcfg, "branch", "pg-main", "pg-dev", "--wait", "--timeout", "1")
    assert code == 1 and "timed out after 1s waiting for PVC pg-dev" in err


def test_wait_survives_a_compacted_watch(fake: FakeKube, kcfg: str) -> None:
    """The resourceVersion the plugin read is already compacted when it starts watching:
    the server answers 410 Gone, and the wait re-reads and carries on until Bound."""
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.bind_delay = 0.5
    orig_add = fake.add

    def add_then_compact(resource: str, obj: Any, *, react: bool = True) -> Any:
        res = orig_add(resource, obj, react=react)
        if resource == "persistentvolumeclaims":
            fake.rv += 1  # history moves on past the new object's version...
            fake.compact()  # ...and is forgotten
        return res

    fake.add = add_then_compact
    code, out, err = zv(kcfg, "branch", "pg-main", "pg-dev", "--wait", "--timeout", "10")
    assert code == 0 and "bound" in out, err
    created_rv = int(fake.get("persistentvolumeclaims", "db", "pg-dev")["metadata"]["resourceVersion"])
    watched = [int(p.split("resourceVersion=")[1].split("&")[0]) for _, p in fake.requests
               if "watch=true" in p.lower() and "resourceVersion=" in p]
    assert any(rv < fake.compacted_below for rv in watched), (watched, fake.compacted_below, created_rv)


def test_errors_for_missing_objects_and_foreign_classes(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("local", sc="standard"))
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    code, _, err = zv(kcfg, "branch", "nope", "x")
    assert code == 1 and "PersistentVolumeClaim 'nope' not found in namespace 'db'" in err
    code, _, err = zv(kcfg, "branch", "local", "x")
    assert code == 1 and "StorageClass 'standard' (provisioner 'rancher.io/local-path'), not a zvolt class" in err
    code, _, err = zv(kcfg, "branch", "pg-main", "local")
    assert code == 1 and "'local' already exists" in err
    code, _, err = zv(kcfg, "restore", "nosnap", "x")
    assert code == 1 and "VolumeSnapshot 'nosnap' not found" in err
    code, _, err = zv(kcfg, "delete", "ghost")
    assert code == 1 and "no PVC or VolumeSnapshot named 'ghost'" in err
    code, _, err = zv(kcfg, "delete", "local")
    assert code == 1 and "not a zvolt class" in err
    assert fake.get("persistentvolumeclaims", "db", "local") is not None


def test_an_unbound_source_is_refused(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake, wffc=True)
    fake.add("persistentvolumeclaims", pvc("fresh", bound=False))  # no pod yet: stays Pending
    for args in (("branch", "fresh", "x"), ("snapshot", "fresh", "s")):
        code, _, err = zv(kcfg, *args)
        assert code == 1 and "'fresh' is Pending, not Bound" in err
    assert fake.get("persistentvolumeclaims", "db", "x") is None and fake.get("volumesnapshots", "db", "s") is None


def test_missing_snapshot_crds_are_reported(fake: FakeKube, kcfg: str) -> None:
    fake.snapshot_api = False
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    for args in (("snapshot", "pg-main", "s1"), ("restore", "s1", "x"),
                 ("branch", "pg-main", "x", "--from-snapshot", "s1"), ("delete", "snapshot/s1")):
        code, _, err = zv(kcfg, *args)
        assert code == 1 and "VolumeSnapshot API (snapshot.storage.k8s.io/v1) is not installed" in err, args
    # Listing still works without the snapshot API: volumes only.
    code, out, _ = zv(kcfg, "ls", "-o", "json")
    assert code == 0 and json.loads(out)["snapshots"] == []
    # And branching by clone needs no snapshot API at all.
    assert zv(kcfg, "branch", "pg-main", "pg-dev", "--wait")[0] == 0


def test_snapshot_restore_delete_cycle(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main", size="8Gi"))
    code, out, _ = zv(kcfg, "snapshot", "pg-main", "before-migration", "--wait")
    assert code == 0 and out.startswith("volumesnapshot/before-migration readytouse in ")
    snap = fake.get("volumesnapshots", "db", "before-migration")
    assert snap["spec"] == {"volumeSnapshotClassName": "zvolt",  # type: ignore[index]
                            "source": {"persistentVolumeClaimName": "pg-main"}}
    code, _, err = zv(kcfg, "snapshot", "pg-main", "before-migration")
    assert code == 1 and "already exists" in err
    code, out, _ = zv(kcfg, "restore", "before-migration", "pg-restored", "--wait")
    assert code == 0 and "pg-restored bound" in out
    restored = fake.get("persistentvolumeclaims", "db", "pg-restored")
    assert restored["spec"]["storageClassName"] == "zvolt-postgres"  # type: ignore[index]
    assert restored["spec"]["resources"]["requests"]["storage"] == "8Gi"  # type: ignore[index]
    assert zv(kcfg, "delete", "snapshot/before-migration")[0] == 0
    assert fake.get("volumesnapshots", "db", "before-migration") is None
    assert zv(kcfg, "delete", "pg-restored")[0] == 0
    assert fake.get("persistentvolumeclaims", "db", "pg-restored") is None


def test_restore_after_the_source_pvc_is_gone_needs_a_class(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    assert zv(kcfg, "snapshot", "pg-main", "s1", "--wait")[0] == 0
    fake.remove("persistentvolumeclaims", "db", "pg-main")
    code, _, err = zv(kcfg, "restore", "s1", "back")
    assert code == 1 and "--storage-class" in err
    code, _, err = zv(kcfg, "restore", "s1", "back", "--storage-class", "standard")
    assert code == 1 and "not a zvolt class" in err
    code, out, _ = zv(kcfg, "restore", "s1", "back", "--storage-class", "zvolt", "--wait")
    assert code == 0 and "bound" in out


def test_delete_ambiguous_name_asks_for_a_kind(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("same"))
    assert zv(kcfg, "snapshot", "same", "same", "--wait")[0] == 0
    code, _, err = zv(kcfg, "delete", "same")
    assert code == 1 and "say pvc/same or snapshot/same" in err
    assert zv(kcfg, "delete", "pvc/same")[0] == 0
    assert fake.get("volumesnapshots", "db", "same") is not None


def test_namespace_and_context_flags(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("in-db"))
    fake.add("persistentvolumeclaims", pvc("in-other", ns="other"))
    fake.add("persistentvolumeclaims", pvc("in-prod", ns="prod"))

    def names(*flags: str) -> list[str]:
        code, out, _ = zv(kcfg, "ls", "-o", "json", *flags)
        assert code == 0
        return [v["name"] for v in json.loads(out)["volumes"]]

    assert names() == ["in-db"]  # the current context's namespace
    assert names("--context", "other") == ["in-other"]
    assert names("-n", "prod") == ["in-prod"]
    assert names("--context", "other", "--namespace", "prod") == ["in-prod"]
    code, _, err = zv(kcfg, "ls", "--context", "nope")
    assert code == 1 and "context 'nope' not found" in err


def test_global_flags_go_before_the_subcommand_too(fake: FakeKube, kcfg: str) -> None:
    """As with kubectl itself: `kubectl zvolt --kubeconfig F -n prod ls`."""
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("in-db"))
    fake.add("persistentvolumeclaims", pvc("in-prod", ns="prod"))
    for argv in (["--kubeconfig", kcfg, "-n", "prod", "ls", "-o", "json"],
                 [f"--kubeconfig={kcfg}", "ls", "-o", "json", "--namespace", "prod"],
                 ["--kubeconfig", kcfg, "--namespace", "default", "ls", "-o", "json", "-n", "prod"]):
        out = io.StringIO()
        assert cli.run(argv, execute=Recorder(), out=out) == 0
        assert [v["name"] for v in json.loads(out.getvalue())["volumes"]] == ["in-prod"], argv


def test_ls_table_json_yaml(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main", size="10Gi"))
    fake.add("persistentvolumeclaims", pvc("not-ours", sc="standard"))
    assert zv(kcfg, "snapshot", "pg-main", "s1", "--wait")[0] == 0
    assert zv(kcfg, "branch", "pg-main", "pg-dev", "--wait")[0] == 0
    code, out, _ = zv(kcfg, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["PVC", "STATUS", "SIZE", "CLASS", "SOURCE", "AGE"]
    assert lines[1].split()[:5] == ["pg-dev", "Bound", "10Gi", "zvolt-postgres", "pvc/pg-main"]
    assert lines[2].split()[:4] == ["pg-main", "Bound", "10Gi", "zvolt-postgres"]
    assert "not-ours" not in out
    assert lines[4].split()[:4] == ["SNAPSHOT", "READY", "SIZE", "SOURCE"]
    assert lines[5].split()[:4] == ["s1", "true", "10Gi", "pg-main"]
    data = json.loads(zv(kcfg, "ls", "-o", "json")[1])
    assert [v["name"] for v in data["volumes"]] == ["pg-dev", "pg-main"]
    assert data["volumes"][0]["source"] == {"kind": "PersistentVolumeClaim", "name": "pg-main"}
    assert data["snapshots"][0]["readyToUse"] is True
    assert yaml.safe_load(zv(kcfg, "ls", "-o", "yaml")[1]) == data


def test_tree_draws_the_branch_graph(fake: FakeKube, kcfg: str) -> None:
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main", size="10Gi"))
    fake.add("persistentvolumeclaims", pvc("other", size="1Gi"))
    assert zv(kcfg, "snapshot", "pg-main", "nightly", "--wait")[0] == 0
    assert zv(kcfg, "branch", "pg-main", "pg-test", "--from-snapshot", "nightly", "--wait")[0] == 0
    assert zv(kcfg, "branch", "pg-test", "pg-test-2", "--wait")[0] == 0
    assert zv(kcfg, "branch", "pg-main", "pg-dev", "--wait")[0] == 0
    code, out, _ = zv(kcfg, "tree")
    assert code == 0
    shape = [line.split("  (")[0] for line in out.splitlines()]
    assert shape == [
        "other",
        "pg-main",
        "├── @nightly",
        "│   └── pg-test",
        "│       └── pg-test-2",
        "└── pg-dev",
    ] or shape == [
        "other",
        "pg-main",
        "├── pg-dev",
        "└── @nightly",
        "    └── pg-test",
        "        └── pg-test-2",
    ], out
    assert "pg-main  (10Gi, Bound, " in out
    code, out, _ = zv(kcfg, "tree", "pg-test")
    assert [line.split("  (")[0] for line in out.splitlines()] == ["pg-test", "└── pg-test-2"]
    data = json.loads(zv(kcfg, "tree", "-o", "json")[1])
    main = next(t for t in data["trees"] if t["name"] == "pg-main")
    assert {c["name"] for c in main["children"]} == {"nightly", "pg-dev"}
    code, _, err = zv(kcfg, "tree", "nope")
    assert code == 1 and "'nope' is not a zvolt volume" in err


def test_tree_marks_branches_of_deleted_sources() -> None:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    vols = [Volume.from_obj({"metadata": {"name": "orphan", "creationTimestamp": "2026-11-21T00:00:00Z"},
                             "spec": {"storageClassName": "zvolt", "resources": {"requests": {"storage": "1Gi"}},
                                      "dataSource": {"kind": "VolumeSnapshot", "name": "gone"}},
                             "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}})]
    snaps = [Snapshot.from_obj({"metadata": {"name": "lonely", "creationTimestamp": "2026-11-21T23:00:00Z"},
                                "spec": {"source": {"persistentVolumeClaimName": "deleted-db"}},
                                "status": {"readyToUse": True, "restoreSize": "2Gi"}})]
    out = tree.render(tree.build(vols, snaps), now)
    assert out.splitlines() == ["@lonely  (2Gi, ready, 60m)  [of deleted PVC deleted-db]",
                                "orphan  (1Gi, Bound, 24h)  [branch of deleted snapshot gone]"]


def test_age_format() -> None:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    assert age(now - timedelta(seconds=5), now) == "5s"
    assert age(now - timedelta(minutes=30), now) == "30m"
    assert age(now - timedelta(hours=5), now) == "5h"
    assert age(now - timedelta(days=3), now) == "3d"
    assert age(None, now) == "<unknown>"


def test_main_prints_errors_and_exits_1(fake: FakeKube, kcfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    zvolt_cluster(fake)
    assert cli.main(["branch", "--kubeconfig", kcfg, "nope", "x"]) == 1
    assert capsys.readouterr().err == "error: PersistentVolumeClaim 'nope' not found in namespace 'db'\n"


def test_checkpoint_through_the_api_servers_exec_websocket(fake: FakeKube, kcfg: str) -> None:
    """The real exec path: the client's websocket stream to the (fake) API server."""
    zvolt_cluster(fake)
    fake.add("persistentvolumeclaims", pvc("pg-main"))
    fake.add("pods", postgres_pod("pg-0", "pg-main"))
    out = io.StringIO()
    assert cli.run(["branch", "--kubeconfig", kcfg, "pg-main", "pg-dev", "--checkpoint", "--wait"], out=out) == 0
    assert fake.execs == [("db", "pg-0", "postgres",
                           ["psql", "-X", "-q", "-U", "postgres", "-d", "postgres", "-c", "CHECKPOINT"])]
    assert "checkpointed pg-0/postgres" in out.getvalue()

    fake.exec_handler = lambda ns, pod, c, argv: (2, 'psql: error: FATAL:  role "postgres" does not exist\n')
    with pytest.raises(PluginError, match=r"failed with status 2: psql: error: FATAL:  role \"postgres\""):
        cli.run(["branch", "--kubeconfig", kcfg, "pg-main", "pg-dev2", "--checkpoint"], out=io.StringIO())
    assert fake.get("persistentvolumeclaims", "db", "pg-dev2") is None
