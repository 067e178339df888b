"""The shell scripts under hack/ that CI depends on, run for real against a throwaway cache."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KUBE_BIN = ROOT / "hack" / "kube-bin.sh"

# Stand-in binaries (fakes named as such): each prints a first line, then keeps writing for
# a while, the way kubectl prints its client version and then the kustomize line.
_CHATTY_FAKE = """#!/bin/sh
echo "{name} fake v0"
i=0
while [ $i -lt 2000 ]; do echo "more output from the {name} fake, line $i"; i=$((i+1)); done
"""


def _cache_with_fakes(tmp_path: Path) -> Path:
    text = KUBE_BIN.read_text()
    k8s = re.search(r"^K8S_VERSION=v(\S+)", text, re.M)
    etcd = re.search(r"^ETCD_VERSION=v(\S+)", text, re.M)
    recipe = re.search(r"^RECIPE=(\S+)", text, re.M)
    assert k8s, "hack/kube-bin.sh no longer pins K8S_VERSION"
    assert etcd, "hack/kube-bin.sh no longer pins ETCD_VERSION"
    assert recipe, "hack/kube-bin.sh no longer has a RECIPE"
    key = f"{k8s.group(1)}-etcd{etcd.group(1)}-r{recipe.group(1)}"
    bin_dir = tmp_path / "kube" / key / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("kube-apiserver", "kubectl", "etcd"):
        fake = bin_dir / name
        fake.write_text(_CHATTY_FAKE.format(name=name))
        fake.chmod(0o755)
    return tmp_path


def test_kube_bin_summary_survives_chatty_binaries(tmp_path: Path) -> None:
    """The summary printed after the build must not die of SIGPIPE (exit 141) when a
    binary writes more after the line that is shown (the cold-machine CI flake)."""
    cache = _cache_with_fakes(tmp_path)
    env = {**os.environ, "MESHLINK_CACHE": str(cache)}
    for _ in range(5):
        proc = subprocess.run(
            ["bash", str(KUBE_BIN)], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
        shown = proc.stdout.splitlines()
        assert shown[1:] == ["kube-apiserver fake v0", "etcd fake v0", "kubectl fake v0"], shown


def test_kube_bin_print_dir_builds_nothing_when_cached(tmp_path: Path) -> None:
    cache = _cache_with_fakes(tmp_path)
    env = {**os.environ, "MESHLINK_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["bash", str(KUBE_BIN), "--print-dir"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_dir()
    assert "building" not in proc.stderr


CONFORMANCE = ROOT / "hack" / "conformance.sh"


def test_conformance_without_a_suite_says_what_to_pass_in_one_line(tmp_path: Path) -> None:
    """The upstream suite cannot be fetched here (not on the Go module proxy): without
    --suite-src the script fails at once with one line naming the flag, builds nothing and
    brings up no cluster."""
    env = {**os.environ, "MESHLINK_CACHE": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(CONFORMANCE)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert "--suite-src DIR" in line, line
    assert "kubernetes-sigs/mcs-api" in line, line
    assert list(tmp_path.iterdir()) == []


def test_conformance_refuses_a_directory_that_is_not_the_suites_repository(
    tmp_path: Path,
) -> None:
    (tmp_path / "src" / "conformance").mkdir(parents=True)
    env = {**os.environ, "MESHLINK_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["bash", str(CONFORMANCE), "--suite-src", str(tmp_path / "src")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "not the root of a kubernetes-sigs/mcs-api checkout" in proc.stderr
    assert not (tmp_path / "cache").exists()
