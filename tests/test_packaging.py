"""Packaging: version ranges that hold the tested releases, py.typed shipped, CI on exact versions,
and only timm's public API in the source."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hvpmtl"
PRIVATE_TIMM = ("_pos_embed", "_manipulate", "_builder", "_helpers", "_registry", "_hub")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in project()["project"]["dependencies"]]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize(
    "name, inside, outside",
    [
        ("torch", ["2.14.1", "2.11.0"], ["2.6.0", "2.10.0", "2.15.0"]),
        ("torchvision", ["0.29.1", "0.26.0"], ["0.21.0", "0.25.0", "0.30.0"]),
        ("timm", ["1.0.15", version("timm")], ["1.0.14", "2.0.0"]),
    ],
)
def test_dependency_ranges_hold_the_tested_releases(name, inside, outside):
    spec = requirements()[name].specifier
    assert not any(s.operator == "==" for s in spec), f"{name}: an exact pin belongs in .ci/run, not the package"
    for v in inside:
        assert spec.contains(v), (name, v, str(spec))
    for v in outside:
        assert not spec.contains(v), (name, v, str(spec))


def test_ci_installs_the_exact_tested_releases():
    ci = (ROOT / ".ci" / "run").read_text()
    assert '"torch==2.14.1"' in ci and '"torchvision==0.29.1"' in ci


def readme_test_command() -> str:
    """The command line of the README's second code block (install and run the tests)."""
    blocks = (ROOT / "README.md").read_text().split("```bash\n")[1:3]
    lines = [ln for ln in blocks[1].split("```")[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    """CI must see what a new user sees: the README's own command, in an environment it makes."""
    command = readme_test_command()
    assert "pytest" in command and '-e ".[test]"' in command
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, command
    venv_at = next(i for i, ln in enumerate(ci_lines) if ln.startswith("python3 -m venv "))
    activate_at = next(i for i, ln in enumerate(ci_lines) if ln.startswith("source ") and "/bin/activate" in ln)
    assert venv_at < activate_at < ci_lines.index(command)


def test_readme_names_the_fast_subset_and_the_slow_marker_exists():
    """The quick check of the tests (no end-to-end runs) is a command the README gives, and the
    marker it deselects is declared (pytest would otherwise only warn about an unknown mark)."""
    readme = (ROOT / "README.md").read_text()
    assert 'python -m pytest -q -m "not slow"' in readme
    markers = project()["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_tracker_extras_are_declared_and_not_required():
    extras = project()["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["wandb"]] == ["wandb"]
    assert [Requirement(r).name for r in extras["mlflow"]] == ["mlflow"]
    assert not {"wandb", "mlflow"} & set(requirements())


def test_py_typed_is_package_data():
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in project()["tool"]["setuptools"]["package-data"]["hvpmtl"]


def _private_timm_uses(path: Path) -> list[str]:
    """``timm`` imports or attribute chains with a private part, and the ViT's private ``_pos_embed``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "timm":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "timm"]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_TIMM:
            names = [f"?.{node.attr}"]
        found += [f"{path}:{node.lineno}: {n}" for n in names
                  if any(part.startswith("_") for part in n.split("."))]  # fmt: skip
    return found


def test_source_uses_only_public_timm_api(tmp_path):
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _private_timm_uses(path)]
    assert not found, "\n".join(found)
    probe = tmp_path / "probe.py"  # the check itself finds what it looks for
    probe.write_text("from timm.models._manipulate import checkpoint_seq\nx = model._pos_embed(t)\n")
    assert len(_private_timm_uses(probe)) == 3


@pytest.mark.slow
def test_wheel_ships_py_typed_presets_and_the_ranges(tmp_path):
    tree = tmp_path / "tree"  # a copy: building in place would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, tree / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    cmd.append(str(tree))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("hvpmtl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "hvpmtl/py.typed" in names and "hvpmtl/configs/cpu-tiny.yaml" in names
    requires = {Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")}  # fmt: skip
    torch_req = next(r for r in requires if r.name == "torch" and not r.marker)
    assert torch_req.specifier.contains("2.14.1") and not torch_req.specifier.contains("2.15.0")
    assert any(r.name == "wandb" and "wandb" in str(r.marker) for r in requires)
