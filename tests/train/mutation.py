"""Mutation testing of the distillation losses, projectors and teacher features (mutmut).

    .venv/bin/python tests/train/mutation.py [--jobs 2] [--work /tmp/retrofit-mutation] [--report-only]

Copies the package, tests and models into a scratch directory (mutmut rewrites sources
under ``mutants/``; the working tree is never touched), configures mutmut there, runs it
over :data:`MODULES` with the fast known-value tests in :data:`TESTS`, and prints mutants,
killed, survived and the kill rate per module, then every survivor. Not a pytest test:
it takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = ["retrofit_agent/train/losses.py", "retrofit_agent/train/projectors.py", "retrofit_agent/train/teacher.py"]
TESTS = ["tests/train/test_losses.py", "tests/train/test_models.py", "tests/train/test_zeroshot.py"]
KILLED = {1, 3, 36, 24, -24, 152, 255}  # pytest failed, or the mutant hung (a timeout counts as caught)
CONFIG = f"""
[tool.mutmut]
source_paths = ["retrofit_agent"]
only_mutate = {json.dumps(MODULES)}
pytest_add_cli_args_test_selection = {json.dumps(TESTS)}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
also_copy = ["models"]
process_isolation = "forkserver"  # torch is not fork-safe once its thread pools exist
"""


def prepare(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "world")
    for name in ("retrofit_agent", "tests", "models"):
        shutil.copytree(REPO / name, work / name, ignore=ignore, symlinks=True)
    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + CONFIG)


def report(work: Path) -> float:
    rows, survivors = [], []
    for module in MODULES:
        meta = json.loads((work / "mutants" / (module + ".meta")).read_text())["exit_code_by_key"]
        counts = Counter("killed" if code in KILLED else "survived" if code == 0 else "other" for code in meta.values())
        survivors += [name for name, code in meta.items() if code == 0]
        tested = counts["killed"] + counts["survived"]
        rows.append(
            (
                module,
                len(meta),
                counts["killed"],
                counts["survived"],
                counts["other"],
                counts["killed"] / max(tested, 1),
            )
        )
    total = [sum(r[i] for r in rows) for i in (1, 2, 3, 4)]
    rate = total[1] / max(total[1] + total[2], 1)
    print(f"{'module':40s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'other':>6s} {'rate':>6s}")
    for m, n, k, s, o, r in rows:
        print(f"{m:40s} {n:8d} {k:7d} {s:9d} {o:6d} {r:6.1%}")
    print(f"{'total':40s} {total[0]:8d} {total[1]:7d} {total[2]:9d} {total[3]:6d} {rate:6.1%}")
    print("\nsurvivors (mutmut show NAME in the work directory prints the diff):")
    for name in survivors:
        print("  " + name)
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/retrofit-mutation"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="print the table of an earlier run")
    a = p.parse_args()
    if not a.report_only:
        prepare(a.work)
        mutmut = Path(sys.executable).with_name("mutmut")
        subprocess.run([str(mutmut), "run", "--max-children", str(a.jobs)], cwd=a.work, check=False)
    return 0 if report(a.work) >= 0.85 else 1


if __name__ == "__main__":
    raise SystemExit(main())
