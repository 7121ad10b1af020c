"""The distillation recipe, side by side: what the camera gets from each (issue 11's question).

- ``consistent`` (today's defaults): the teacher sees the student's augmented view
  (``augment.teacher_view = "same"``, two cached views per picture) and the affinity KL softmaxes
  within each label group, as the camera does (``loss.affinity_softmax = "group"``).
- ``earlier`` (the recipe before the fix): the teacher sees the clean picture while the student
  sees the augmented one (one cached view), and the affinity KL softmaxes over every label at once.

Both distil the same student from the same teacher on the same world pictures, for each seed,
through the product's own chain (:mod:`retrofit_agent.train.chain`): export, int8, bundle, and
the real daemon on the world's drive clip, scored per group against its ground truth. Medians
over seeds are printed; nothing is judged.

    python benchmarks/distill_recipes.py --work runs/recipes [--profile models/configs/chain-ci.toml]
        [--teacher MODEL=CHECKPOINT] [--seeds 3]

``--teacher`` replaces the profile's teacher with a trained checkpoint (e.g. a snapshot of the
reference build's world teacher): a stronger teacher shows the recipes on more groups than the
CI teacher, which learns only time of day and weather in its minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit_agent.train.chain import Chain, load_chain_config  # noqa: E402

RECIPES = {
    "consistent": ["augment.teacher_view=same", "cache.views=2", "loss.affinity_softmax=group"],
    "earlier": ["augment.teacher_view=clean", "cache.views=1", "loss.affinity_softmax=flat"],
}
SHARED = ("world", "clip", "teacher", "bank")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--profile", type=Path, default=REPO / "models/configs/chain-ci.toml")
    p.add_argument("--teacher", help="MODEL=CHECKPOINT: a trained teacher instead of the profile's")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    from retrofit_agent.contract.logs import configure_logging

    configure_logging("json", "warning")
    base_cfg = load_chain_config(a.profile)
    shared = a.work / "shared"
    base = Chain(base_cfg, shared, shared / "bundle")
    base.run(until="bank")
    if a.teacher:
        model, _, checkpoint = a.teacher.partition("=")
        base.results["teacher"] = {"model": model, "checkpoint": str(Path(checkpoint).resolve()), "eval": {}}
        base.keys["teacher"] = f"given:{model}:{Path(checkpoint).stat().st_mtime_ns}"
        (shared / "bank").mkdir(exist_ok=True)
        base.path("bank", "done.json").unlink(missing_ok=True)
        base.results["bank"] = base._bank()
    rows: dict[str, list[dict[str, float]]] = {}
    for recipe, overrides in RECIPES.items():
        for seed in range(a.seeds):
            cfg = base_cfg.model_copy(
                update={
                    "distill": base_cfg.distill.model_copy(
                        update={"overrides": [*base_cfg.distill.overrides, *overrides, f"run.seed={seed}"]}
                    ),
                    "score": base_cfg.score.model_copy(update={"goals": {}}),
                }
            )
            work = a.work / f"{recipe}-seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            for name in ("world", "clip"):  # the same pictures and clip for every run
                if not (work / name).exists():
                    (work / name).symlink_to((shared / name).resolve())
            chain = Chain(cfg, work, work / "bundle")
            chain.results.update({k: base.results[k] for k in SHARED})
            chain.keys.update({k: base.keys[k] for k in SHARED})
            chain.run(start="distill")
            rows.setdefault(recipe, []).append(chain.results["score"]["top1"])
            print(f"{recipe} seed {seed}: {chain.results['score']['top1']}", flush=True)
    groups = list(rows["consistent"][0])
    print(f"\nthe daemon's top-1 on the clip, median of {a.seeds} seeds (teacher: {base.results['teacher']['model']})")
    print(f"{'group':16}{'consistent':>12}{'earlier':>10}{'difference':>12}")
    for g in groups:
        c = statistics.median(r[g] for r in rows["consistent"])
        e = statistics.median(r[g] for r in rows["earlier"])
        print(f"{g:16}{c:>12.1%}{e:>10.1%}{c - e:>+12.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
