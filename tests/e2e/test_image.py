"""The Containerfile gives docker users the image hack/image.sh builds without a daemon: same
Python, same packages at the same versions, same user, entrypoint and environment, and it
runs with a read-only root filesystem."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.kindbed import KindTestbed, docker
from tests.kube import REPO

pytestmark = pytest.mark.timeout(1800)

BASE = "meshlink.local/debian:bookworm-minbase"
"""A stand-in for debian:bookworm-slim, which cannot be pulled here: Debian bookworm
minbase from mmdebstrap (hack/lib/oci.sh)."""
PROBE = (
    "import sys, importlib.metadata as m; print(sys.version.split()[0]); "
    "print(sorted((d.metadata['Name'].lower(), d.version) for d in m.distributions()))"
)


def _image_facts(image: str) -> dict[str, object]:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    packages = docker(
        "run", "--rm", "--read-only", "--entrypoint", "/opt/meshlink/bin/python", image, "-c", PROBE
    )
    version = docker("run", "--rm", "--read-only", image, "--version").strip()
    return {
        "user": config["User"],
        "entrypoint": config["Entrypoint"],
        "cmd": config["Cmd"],
        "env": sorted(e for e in config["Env"] if not e.startswith("PATH=")),
        "python_and_packages": packages.splitlines(),
        "meshlink --version": version,
    }


def test_containerfile_builds_the_same_image(kind_testbed: KindTestbed, tmp_path: Path) -> None:
    # kind_testbed: dockerd runs, and hack/image.sh has just built dist/image/.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    archive = REPO / "dist" / "image" / f"meshlink-{version}.tar"
    docker("load", "-i", str(archive), timeout=300)
    ours = f"ghcr.io/meshlink/meshlink:{version}"

    # The build context: the tracked source, plus wheels so pip needs no index.
    ctx = tmp_path / "ctx"
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (ctx / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, ctx / f)
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "pip"),
            "download",
            "-q",
            "--only-binary=:all:",
            "-d",
            str(ctx / "wheels"),
            "-r",
            str(REPO / "hack" / "image" / "requirements.txt"),
            "setuptools>=77",
            "wheel",
        ],
        check=True,
        timeout=600,
    )
    base_tar = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/lib/oci.sh && debian_rootfs_tar debian-minbase apt"],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    ).stdout.strip()
    docker("import", base_tar, BASE, timeout=300)
    built = "meshlink.local/meshlink-containerfile:test"
    docker(
        "build",
        "--network",
        "host",
        "-f",
        str(ctx / "Containerfile"),
        "--build-arg",
        f"BASE={BASE}",
        "--build-arg",
        "PIP_NO_INDEX=1",
        "--build-arg",
        "PIP_FIND_LINKS=/src/wheels",
        "-t",
        built,
        str(ctx),
        timeout=1500,
        env={"DOCKER_BUILDKIT": "0"},
    )
    try:
        assert _image_facts(built) == _image_facts(ours)
    finally:
        docker("image", "rm", "-f", built, BASE, check=False)
