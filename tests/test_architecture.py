"""The house's dependency rule, checked from the code's own imports.

Three wings: ``contract/`` is what both halves share and imports neither of them;
``daemon/`` (on the vehicle) and ``train/`` (the toolchain) import ``contract/`` and never
each other. Nothing outside ``train/`` imports the training stack, so the runtime installs
and runs without torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "retrofit_agent"
HEAVY = {"torch", "torchvision", "timm", "open_clip", "onnx"}
# wing -> the other wings it must never import
FORBIDDEN = {
    "contract": ("retrofit_agent.daemon", "retrofit_agent.train"),
    "daemon": ("retrofit_agent.train",),
    "train": ("retrofit_agent.daemon",),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _wing(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "root"


def test_every_module_lives_in_a_wing():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside contract/, daemon/ and train/: {loose}"


@pytest.mark.parametrize("wing", sorted(FORBIDDEN))
def test_wings_import_only_what_the_rule_allows(wing):
    offenders = []
    for path in (PACKAGE / wing).rglob("*.py"):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[wing]):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_no_runtime_module_imports_the_training_stack():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if _wing(path) == "train":
            continue
        for name in _imports(path):
            if name.split(".")[0] in HEAVY:
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_every_runtime_module_imports_with_torch_blocked():
    code = (
        "import sys, pkgutil, importlib\n"
        "for m in ('torch', 'torchvision', 'timm', 'open_clip', 'onnx'): sys.modules[m] = None\n"
        "import retrofit_agent.contract, retrofit_agent.daemon\n"
        "for pkg in (retrofit_agent.contract, retrofit_agent.daemon):\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(mod.name)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
