"""The package's architecture: the import-linter contracts in pyproject.toml
hold, they name every core module, ``import dennl_jax`` loads no part of the
recommender application, and no module reaches into another's private names
or into JAX's private API."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dennl_jax"


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _contracts():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_hold():
  pytest.importorskip("importlinter")
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
       "sys.exit(lint_imports())"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_contracts_name_every_core_module():
  core = {name for name, _ in _modules()
          if name != "dennl_jax" and not name.startswith("dennl_jax.recsys")}
  contracts = {c["type"]: c for c in _contracts()}
  forbidden = set(contracts["forbidden"]["source_modules"]) - {"dennl_jax"}
  layered = {"dennl_jax." + name.strip() for layer in contracts["layers"]["layers"]
             for name in layer.split(":")} - {"dennl_jax.recsys"}
  assert forbidden == core, sorted(core ^ forbidden)
  assert layered == core, sorted(core ^ layered)


def test_importing_the_core_loads_no_application_module():
  code = ("import sys, dennl_jax; print(sorted(m for m in sys.modules "
          "if m.startswith('dennl_jax.recsys')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def _imported_module(node: ast.ImportFrom, module: str) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")[:-node.level] if module.count(".") else []
  return ".".join(base + ([node.module] if node.module else []))


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda v: str(v).split("/")[-1])
def test_no_private_names_across_modules(name, path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      source = _imported_module(node, name)
      assert not source.startswith("jax._src"), f"{path.name}:{node.lineno} imports {source}"
      if source.startswith("dennl_jax") and source != name:
        private = [a.name for a in node.names if a.name.startswith("_")
                   and not a.name.startswith("__") and f"{source}.{a.name}" not in
                   {m for m, _ in _modules()}]
        assert not private, f"{path.name}:{node.lineno} imports {private} from {source}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        assert not alias.name.startswith("jax._src"), f"{path.name}:{node.lineno}"
