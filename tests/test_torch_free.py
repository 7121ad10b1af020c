"""The runtime must import and run without torch: nothing outside retrofit_agent/train may import it."""

import ast
import subprocess
import sys

from conftest import REPO

HEAVY = {"torch", "torchvision", "timm", "open_clip", "onnx"}


def test_no_runtime_module_imports_the_training_stack():
    offenders = []
    for path in (REPO / "retrofit_agent").rglob("*.py"):
        if "train" in path.relative_to(REPO / "retrofit_agent").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in HEAVY or n.startswith("retrofit_agent.train"):
                    offenders.append(f"{path.relative_to(REPO)}: {n}")
    assert not offenders, offenders


def test_every_runtime_module_imports_with_torch_blocked():
    code = (
        "import sys, pkgutil, importlib\n"
        "for m in ('torch', 'torchvision', 'timm', 'open_clip', 'onnx'): sys.modules[m] = None\n"
        "import retrofit_agent\n"
        "for mod in pkgutil.iter_modules(retrofit_agent.__path__):\n"
        "    if mod.name not in ('train', '__main__'):\n"
        "        importlib.import_module('retrofit_agent.' + mod.name)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
