"""environment.yml (the GPU VM's conda environment) without conda: it parses, asks for CUDA
PyTorch from conda-forge, agrees with pyproject.toml's dependencies, and its pip section
resolves (pip install --dry-run, torch held at this machine's CPU build)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# pyproject name -> conda-forge name, where they differ
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}
# conda packages that are the environment's plumbing, not dependencies of the package
PLUMBING = {"python", "pip", "cuda-version"}
CONDA_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\s*(?P<version>[^\s]*)\s*(?P<build>\S*)$")


@pytest.fixture(scope="module")
def env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def conda_specs(env: dict) -> dict[str, tuple[str, str]]:
    """name -> (version constraint, build string) of the conda dependencies."""
    specs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            match = CONDA_SPEC.match(dep.strip())
            assert match, f"cannot read conda spec {dep!r}"
            version = match["version"]
            if version.startswith("=") and not version.startswith("=="):  # conda's =3.11 is 3.11.*
                version = "==" + version[1:] + ".*"
            specs[match["name"]] = (version, match["build"])
    return specs


def pip_section(env: dict) -> list[str]:
    sections = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict)]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_environment_basics(env, project):
    assert env["name"] == "backpack-nb"
    assert env["channels"][0] == "conda-forge"
    assert "pytorch" not in env["channels"] and "defaults" not in env["channels"]
    version, _ = conda_specs(env)["python"]
    assert version == "==3.11.*"
    assert SpecifierSet(project["requires-python"]).contains("3.11.9")


def test_cuda_pytorch_from_conda_forge(env):
    specs = conda_specs(env)
    version, build = specs["pytorch"]
    assert build.startswith("cuda"), "the CPU build would be picked on a machine without a driver"
    cuda_version, _ = specs["cuda-version"]
    # the Deep Learning VM image (nvidia-570 driver) runs CUDA 12.x, not 13
    assert "<13" in cuda_version.split(",")


def test_dependencies_agree_with_pyproject(env, project):
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    conda = conda_specs(env)
    pip = {canonicalize_name(Requirement(line).name): Requirement(line)
           for line in pip_section(env) if not line.startswith("-")}

    for name, req in wanted.items():
        conda_name = CONDA_NAMES.get(name, name)
        if conda_name in conda:
            assert SpecifierSet(conda[conda_name][0]) == req.specifier, (
                f"{conda_name} in environment.yml is {conda[conda_name][0]!r}, pyproject says {req}")
        else:
            assert name in pip, f"{req} (pyproject.toml) is missing from environment.yml"
            assert pip[name].specifier == req.specifier, f"{pip[name]} vs {req}"

    back = {v: k for k, v in CONDA_NAMES.items()}
    extra = [n for n in conda if n not in PLUMBING and canonicalize_name(back.get(n, n)) not in wanted]
    extra += [n for n in pip if n not in wanted]
    assert not extra, f"in environment.yml but not in pyproject.toml's dependencies: {extra}"
    assert not set(conda) & set(pip), "a package in both the conda and the pip lists"


def test_package_installed_editable_from_the_checkout(env):
    assert pip_section(env)[-1] == "-e ."


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow  # pip resolves the environment: seconds
def test_pip_section_resolves(env, tmp_path):
    """The pip lines resolve against this venv (torch held at the local CPU 2.13.0): `-e .` builds
    metadata from a copy of pyproject.toml, never touching the checkout."""
    (tmp_path / "backpack_nb").mkdir()
    (tmp_path / "backpack_nb" / "__init__.py").write_text("")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path)
    (tmp_path / "requirements.txt").write_text("\n".join(pip_section(env)) + "\n")
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
         "-r", "requirements.txt", "-c", "constraints.txt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0 and not _pypi_reachable():
        pytest.skip("PyPI is unreachable: cannot resolve the pip section")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    planned = {item["metadata"]["name"]: item["metadata"]["version"]
               for item in json.loads(result.stdout)["install"]}
    assert "backpack-nb" in planned
    assert "torch" not in planned, f"pip would replace torch: {planned}"
