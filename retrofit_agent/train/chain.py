"""The whole chain on the procedural world, in cached, resumable stages:

    world → clip → teacher → distill → qat → export → bank → quantize → bundle → score

``retrofit-model chain --config models/configs/chain-ci.toml --work DIR --out BUNDLE`` runs what is
not done yet. Each stage records ``done.json`` with a key over its settings and the keys of the
stages it reads; a stage whose key still matches is skipped, so a build survives interruption
and can be run in pieces (``--until STAGE``). The two long stages resume from their own
checkpoints: ``teacher-train --resume`` and ``distill --resume auto``.

Every stage is the ``retrofit-model`` command a person would type (run in this process, so
torch loads once), and the last one is the product itself: ``retrofit-agent`` as a subprocess
on the world's drive clip, its ``tags`` taken over ZeroMQ and scored per group against the
clip's ground truth (:mod:`.world.score`).

Two profiles ship: ``chain-ci.toml`` (a tiny teacher and student: minutes; CI asserts accuracy
well above chance) and ``chain-reference.toml`` (the reference bundle: CPU hours).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrofit_agent.contract.errors import ConfigError, RetrofitError
from retrofit_agent.contract.settings import load_settings

log = structlog.get_logger("retrofit_agent.train.chain")
REPO = Path(__file__).resolve().parents[2]
STAGES = ("world", "clip", "teacher", "distill", "qat", "export", "bank", "quantize", "bundle", "score")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldStage(_Strict):
    seed: int = Field(1, ge=0, description="World seed of the distillation pictures.")
    count: int = Field(3000, ge=16, description="Pictures the student is distilled on.")
    heldout_seed: int = Field(7, ge=0, description="World seed of the held-out pictures (quantization gate).")
    heldout_count: int = Field(200, ge=8)
    size: int = Field(224, ge=32, le=1024, description="Picture side in pixels.")
    shard_size: int = Field(1000, ge=16)


class ClipStage(_Strict):
    seed: int = Field(0, ge=0)
    segment_seconds: float = Field(8.0, gt=0)
    size: str = Field("640x360", pattern=r"^\d+x\d+$")
    segments: str | None = Field(None, description="Segment names; unset: the drive that shows every label.")


class TeacherPhase(_Strict):
    config: Path = Field(description="teacher-train recipe (TOML), relative to the repo.")
    overrides: list[str] = Field(default_factory=list, description="--set KEY=VALUE for teacher-train.")


class TeacherStage(TeacherPhase):
    pretrain: list[TeacherPhase] = Field(
        default_factory=list,
        description="Earlier phases, in order, trained into WORK/teacher-pretrain, WORK/teacher-pretrain-2, ...; "
        "each starts from the previous one's weights and the main recipe from the last's (model.init_from), as "
        "open_clip_train fine-tunes from --pretrained.",
    )


class DistillPhase(_Strict):
    config: Path = Field(
        description="distill recipe (TOML), relative to the repo; the chain sets the teacher, data and out_dir."
    )
    overrides: list[str] = Field(default_factory=list)


class DistillStage(DistillPhase):
    pretrain: list[DistillPhase] = Field(
        default_factory=list,
        description="Earlier phases, in order, distilled into WORK/distill-pretrain, -2, ... (e.g. at a resolution "
        "the CPU affords), each from the previous one's student.pt; "
        "the main recipe then starts from its student.pt (student.initial_checkpoint).",
    )


class QatStage(_Strict):
    steps: int = Field(
        0,
        ge=0,
        description="Quantization-aware fine-tune steps (retrofit-model qat) between distill and export; 0: none, "
        "the distilled student is exported as it is.",
    )
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    count: int = Field(2000, ge=8, description="World training pictures its batches are drawn from.")
    threads: int | None = Field(None, ge=1)


class ExportStage(_Strict):
    dense: bool = Field(
        True, description="Also export cell_embeddings (export --dense), so the bundle's daemon can give regions."
    )
    input_size: int | None = Field(
        None, ge=32, le=2048, description="Export at this square side (export --input-size); unset: the distilled one."
    )


class QuantizeStage(_Strict):
    calibration_count: int = Field(256, ge=8)
    heldout_count: int = Field(200, ge=8)
    min_cosine: float = Field(0.98, ge=0, le=1)
    min_agreement: float = Field(0.95, ge=0, le=1)
    method: Literal["minmax", "minmax-mean"] = Field(
        "minmax",
        description="quantize --method: minmax-mean is the range retrofit-model qat trains under (and what a student "
        "with rare huge activations needs)",
    )
    mode: Literal["int8_static_qdq", "none"] = Field(
        "int8_static_qdq",
        description="none: the bundle ships the fp32 model (a student whose int8 the gate refuses; say why in the "
        "chain's config)",
    )


class BundleStage(_Strict):
    name: str = "retrofit-world-reference"
    version: str = "1.0.0-world"
    notice: str = (
        "Trained on the procedural driving world of retrofit_agent.train.world only (synthetic pictures, "
        "a CLIP teacher trained from scratch on them). Its labels mean nothing on real roads."
    )


class ScoreStage(_Strict):
    settle_s: float = Field(1.0, ge=0, description="Seconds after each segment change left out of the score.")
    threads: int = Field(1, ge=1)
    goals: dict[str, float] = Field(
        default_factory=dict, description="group -> least top-1 on the clip; a group missing it fails the stage."
    )
    on_miss: Literal["fail", "report"] = Field(
        "fail",
        description="fail: a missed goal fails the stage; report: the stage records the misses in its result "
        "and warns (a build whose shortfall is known and said, like the reference's object groups).",
    )


class ChainConfig(_Strict):
    prompts_file: Path = Path("models/prompts/automotive.toml")
    world: WorldStage = WorldStage()
    clip: ClipStage = ClipStage()
    teacher: TeacherStage
    distill: DistillStage
    qat: QatStage = QatStage()
    export: ExportStage = ExportStage()
    quantize: QuantizeStage = QuantizeStage()
    bundle: BundleStage = BundleStage()
    score: ScoreStage = ScoreStage()

    @model_validator(mode="after")
    def _qat_matches_calibration(self) -> ChainConfig:
        if self.qat.steps and self.quantize.mode != "none" and self.quantize.method != "minmax-mean":
            raise ValueError(
                "qat.steps > 0 trains under each picture's own range (minmax-mean); set quantize.method = "
                '"minmax-mean", or the int8 model is calibrated to ranges the fine-tune never saw'
            )
        return self


def load_chain_config(path: Path) -> ChainConfig:
    return load_settings(ChainConfig, path)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model(argv: list[str]) -> None:
    """One retrofit-model command, in this process; a non-zero exit stops the chain."""
    from retrofit_agent.train.cli import main

    log.info("chain_command", argv=" ".join(argv))
    code = main(["--log-format", "json", *argv])
    if code != 0:
        raise RetrofitError(f"'retrofit-model {argv[0]}' failed with exit code {code} (its error line is above)")


class Chain:
    def __init__(self, cfg: ChainConfig, work: Path, out: Path) -> None:
        self.cfg, self.work, self.out = cfg, work, out
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def run(self, until: str = "score", force: tuple[str, ...] = (), start: str = "world") -> dict[str, dict[str, Any]]:
        """Run the stages from ``start`` to ``until``; those before ``start`` must already be in
        ``results`` and ``keys`` (a caller sharing them between chains, as benchmarks do)."""
        self.work.mkdir(parents=True, exist_ok=True)
        for name in STAGES[STAGES.index(start) : STAGES.index(until) + 1]:
            stage: Callable[[], dict[str, Any]] = getattr(self, f"_{name}")
            key = self._stage_key(name)
            done = self.path(name, "done.json")
            if name not in force and done.is_file():
                record = json.loads(done.read_text())
                if record.get("key") == key:
                    log.info("chain_stage_cached", stage=name, key=key)
                    self.keys[name], self.results[name] = key, record.get("result", {})
                    continue
            log.info("chain_stage_started", stage=name, key=key)
            t0, c0 = time.monotonic(), time.process_time()
            self.path(name).mkdir(parents=True, exist_ok=True)
            result = stage()
            result["wall_s"] = round(time.monotonic() - t0, 1)
            result["cpu_s"] = round(time.process_time() - c0, 1)  # this process; the daemon's is in score
            done.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
            self.keys[name], self.results[name] = key, result
            log.info("chain_stage_done", stage=name, wall_s=result["wall_s"])
        return self.results

    def _stage_key(self, name: str) -> str:
        c = self.cfg
        upstream = {
            "world": (),
            "clip": (),
            "teacher": (),
            "distill": ("world", "teacher"),
            "qat": ("distill", "world"),
            "export": ("qat",),
            "bank": ("teacher",),
            "quantize": ("export", "bank", "world"),
            "bundle": ("quantize", "bank"),
            "score": ("bundle", "clip"),
        }[name]
        own: Any = {
            "world": c.world,
            "clip": c.clip,
            "teacher": (
                c.teacher,
                _file_text(c.teacher.config),
                [_file_text(p.config) for p in c.teacher.pretrain],
            ),
            "distill": (
                c.distill,
                _file_text(c.distill.config),
                [_file_text(p.config) for p in c.distill.pretrain],
            ),
            "qat": c.qat,
            "export": c.export,
            "bank": str(c.prompts_file),
            "quantize": c.quantize,
            "bundle": (c.bundle, str(self.out)),
            "score": c.score,
        }[name]
        own = own.model_dump(mode="json") if isinstance(own, BaseModel) else own
        if isinstance(own, tuple):
            own = [o.model_dump(mode="json") if isinstance(o, BaseModel) else o for o in own]
        return _key(name, own, [self.keys[u] for u in upstream])

    # ------------------------------------------------------------------ stages

    def _world(self) -> dict[str, Any]:
        w = self.cfg.world
        size = f"{w.size}x{w.size}"
        for sub, seed, count in (("train", w.seed, w.count), ("heldout", w.heldout_seed, w.heldout_count)):
            _model(
                [
                    "world",
                    "images",
                    *("--count", str(count), "--out", str(self.path("world", sub)), "--seed", str(seed)),
                    *("--size", size, "--shard-size", str(w.shard_size), "--prompts", str(self.cfg.prompts_file)),
                ]
            )
        shards = sorted(str(p) for p in self.path("world", "train", "shards").glob("*.tar"))
        return {"train_images": w.count, "heldout_images": w.heldout_count, "shards": shards}

    def _clip(self) -> dict[str, Any]:
        c = self.cfg.clip
        clip = self.path("clip", "drive.mp4")
        argv = ["world", "clip", "--out", str(clip), "--seed", str(c.seed), "--size", c.size]
        argv += ["--segment-seconds", str(c.segment_seconds), "--prompts", str(self.cfg.prompts_file)]
        if c.segments:
            argv += ["--segments", c.segments]
        _model(argv)
        return {"clip": str(clip), "truth": str(clip.with_suffix(".jsonl"))}

    def _phases(
        self,
        stage: str,
        main: TeacherPhase | DistillPhase,
        earlier: Sequence[TeacherPhase | DistillPhase],
        init_key: str,
        weights: str,
        run: Callable[[Path, Path, list[str]], None],
    ) -> list[Path]:
        """Run the ``earlier`` phases into WORK/<stage>-pretrain, -pretrain-2, ..., each from the
        previous one's ``weights`` file (``--set <init_key>=...``), then ``main`` into
        WORK/<stage> from the last; returns the earlier phases' directories."""
        dirs: list[Path] = []
        for i, phase in enumerate([*earlier, main]):
            here = self.path(stage if phase is main else f"{stage}-pretrain" + (f"-{i + 1}" if i else ""))
            init = [f"{init_key}={dirs[-1] / weights}"] if dirs else []
            run(phase.config, here, [*init, *phase.overrides])
            if phase is not main:
                dirs.append(here)
        return dirs

    def _teacher(self) -> dict[str, Any]:
        t = self.cfg.teacher
        out = self.path("teacher")

        def run(config: Path, here: Path, sets: list[str]) -> None:
            _teacher_train(TeacherPhase(config=config, overrides=sets), here)

        earlier = self._phases("teacher", t, t.pretrain, "model.init_from", "checkpoint.pt", run)
        report = json.loads((out / "eval.json").read_text())
        name = json.loads((out / "config.json").read_text())["model"]["name"]
        result = {"model": name, "checkpoint": str(out / "checkpoint.pt"), "eval": _top1(report)}
        if earlier:
            result["pretrain_eval"] = [_top1(json.loads((d / "eval.json").read_text())) for d in earlier]
        return result

    def _distill(self) -> dict[str, Any]:
        d = self.cfg.distill
        out = self.path("distill")

        def run(config: Path, here: Path, sets: list[str]) -> None:
            self._distill_phase(DistillPhase(config=config, overrides=sets), here)

        earlier = self._phases("distill", d, d.pretrain, "student.initial_checkpoint", "student.pt", run)
        result = {"student": str(out / "student.pt"), "last_metrics": _last_json(out / "metrics.jsonl")}
        if earlier:
            result["pretrain_metrics"] = [_last_json(e / "metrics.jsonl") for e in earlier]
        return result

    def _distill_phase(self, phase: DistillPhase, out: Path) -> None:
        teacher = self.results["teacher"]
        shards = self.results["world"]["shards"]
        argv = ["distill", "--config", str(phase.config), "--out", str(out), "--resume", "auto", "--no-progress"]
        sets = [
            f"teacher.model={teacher['model']}",
            f"teacher.pretrained={teacher['checkpoint']}",
            f"data.train={json.dumps(shards)}",
            f"bank.prompts_file={self.cfg.prompts_file}",
            *phase.overrides,
        ]
        sets += self._shared_cache(phase.config, sets)
        for s in sets:
            argv += ["--set", s]
        _model(argv)

    def _qat(self) -> dict[str, Any]:
        q, student = self.cfg.qat, self.results["distill"]["student"]
        if q.steps == 0:
            return {"student": student, "steps": 0}
        out = self.path("qat")
        argv = ["qat", "--checkpoint", student, "--out", str(out), "--steps", str(q.steps)]
        argv += ["--images", str(self.path("world", "train", "images")), "--count", str(q.count)]
        argv += ["--held-out", str(self.path("world", "heldout", "images"))]
        argv += ["--batch-size", str(q.batch_size), "--lr", str(q.lr)]
        if self.cfg.export.input_size:  # fine-tune at the size the bundle runs at
            argv += ["--input-size", str(self.cfg.export.input_size)]
        if q.threads:
            argv += ["--threads", str(q.threads)]
        _model(argv)
        return {"student": str(out / "student.pt"), "steps": q.steps, "metrics": _last_json(out / "metrics.jsonl")}

    def _shared_cache(self, config: Path, sets: list[str]) -> list[str]:
        """``cache.dir=WORK/teacher-cache/<key>``, one folder per set of teacher outputs, so that phases
        that store the same ones (the same teacher, pictures, views and tensors, whatever their
        student, resolution or schedule) build it once rather than once per phase folder. A key
        that missed a difference would be caught by the cache's own key, which refuses in one line."""
        from retrofit_agent.train.config import load_distill_config, parse_overrides

        cfg = load_distill_config(config, parse_overrides(sets))
        if not cfg.cache.enabled or cfg.cache.dir is not None:
            return []
        c = cfg.model_dump(mode="json")
        key = _key(
            "teacher-cache",
            {k: v for k, v in c["cache"].items() if k not in ("dir", "batch_size", "on_mismatch")},
            c["augment"],
            c["teacher"],
            {k: v for k, v in c["data"].items() if k not in ("batch_size", "workers")},
            [cfg.loss.needs_teacher_tokens, cfg.loss.pca_attention > 0 or cfg.loss.pca_value > 0, cfg.loss.dense > 0],
        )
        return [f"cache.dir={self.path('teacher-cache', key)}"]

    def _export(self) -> dict[str, Any]:
        fp32 = self.path("export", "student.fp32.onnx")
        images = self.path("world", "heldout", "images")
        argv = ["export", "--checkpoint", self.results["qat"]["student"], "--images", str(images)]
        e = self.cfg.export
        size = ["--input-size", str(e.input_size)] if e.input_size else []
        _model([*argv, "--out", str(fp32), *(["--dense"] if e.dense else []), *size])
        return {"fp32": str(fp32)}

    def _bank(self) -> dict[str, Any]:
        t = self.results["teacher"]
        bank = self.path("bank", "bank.npz")
        _model(
            [
                "prompts",
                "--prompts",
                str(self.cfg.prompts_file),
                "--teacher",
                t["model"],
                "--pretrained",
                t["checkpoint"],
                "--out",
                str(bank),
            ]
        )
        return {"bank": str(bank)}

    def _quantize(self) -> dict[str, Any]:
        q = self.cfg.quantize
        if q.mode == "none":
            return {"model": self.results["export"]["fp32"], "mode": q.mode}
        int8 = self.path("quantize", "student.int8.onnx")
        _model(
            [
                "quantize",
                *("--fp32", self.results["export"]["fp32"], "--out", str(int8)),
                *("--calibration", str(self.path("world", "train", "images")), "--count", str(q.calibration_count)),
                *("--held-out", str(self.path("world", "heldout", "images")), "--held-out-count", str(q.heldout_count)),
                *("--bank", self.results["bank"]["bank"]),
                *("--min-cosine", str(q.min_cosine), "--min-agreement", str(q.min_agreement)),
                *("--method", q.method),
            ]
        )
        return {"model": str(int8), "mode": q.mode}

    def _bundle(self) -> dict[str, Any]:
        b = self.cfg.bundle
        _model(
            [
                "bundle",
                *("--model", self.results["quantize"]["model"], "--bank", self.results["bank"]["bank"]),
                *("--prompts", str(self.cfg.prompts_file), "--name", b.name, "--version", b.version),
                *("--quantization", self.cfg.quantize.mode, "--notice", b.notice, "--out", str(self.out)),
                *(("--calibration-note", self._calibration_note()) if self.cfg.quantize.mode != "none" else ()),
            ]
        )
        return {"bundle": str(self.out)}

    def _calibration_note(self) -> str:
        note = f"{self.cfg.quantize.method}, {self.cfg.quantize.calibration_count} world pictures"
        steps = self.cfg.qat.steps
        return note + (f", after {steps} steps of quantization-aware fine-tuning (retrofit-model qat)" if steps else "")

    def _score(self) -> dict[str, Any]:
        from retrofit_agent.train.world.score import format_scores, read_truth, score_tags

        s = self.cfg.score
        clip = Path(self.results["clip"]["clip"])
        messages = run_daemon_on_clip(self.out, clip, self.path("score"), s.threads)
        scores = score_tags(messages, read_truth(Path(self.results["clip"]["truth"])), s.settle_s)
        table = format_scores(scores, None)
        (self.path("score", "table.txt")).write_text(table + "\n")
        sys.stdout.write(table + "\n")
        top1 = {g: round(v.accuracy, 4) for g, v in scores.items()}
        missed = {g: (top1.get(g), goal) for g, goal in s.goals.items() if not top1.get(g, 0.0) >= goal}
        if missed and s.on_miss == "fail":
            raise RetrofitError(
                f"score: below the goal on the clip: {missed} (table: {self.path('score', 'table.txt')})"
            )
        if missed:
            log.warning("chain_score_goals_missed", missed=missed, table=str(self.path("score", "table.txt")))
        return {"frames": len(messages), "top1": top1, "missed": {g: list(v) for g, v in missed.items()}}


def run_daemon_on_clip(bundle: Path, clip: Path, work: Path, threads: int = 1) -> list[dict[str, Any]]:
    """Every ``tags`` message the real daemon publishes playing ``clip`` once, taken over ZeroMQ.

    ``--realtime``, as a camera delivers it: a subscriber joins a PUB socket a moment after it
    binds, and the first ~0.1 s of frames (inside the first segment's settle time, never scored)
    are what that costs; at full speed a small model would finish the clip before then."""
    import zmq

    endpoint = f"ipc://{work}/daemon.sock"
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"tags")
    sub.connect(endpoint)
    env = {**os.environ, "RETROFIT_PUBLISH__SEND_HWM": "1000000", "RETROFIT_PUBLISH__REPLAY": "false"}
    argv = [sys.executable, "-m", "retrofit_agent", "--camera", str(clip), "--bundle", str(bundle)]
    argv += ["--publish", endpoint, "--threads", str(threads), "--log-format", "json", "--realtime"]
    argv += ["--metrics-address", "127.0.0.1:0"]
    messages: list[dict[str, Any]] = []
    with open(work / "daemon.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            while True:
                if sub.poll(200):
                    messages.append(json.loads(sub.recv_multipart()[1]))
                elif proc.poll() is not None:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            sub.close()
    if proc.returncode != 0:
        tail = (work / "daemon.log").read_text(errors="replace").splitlines()[-3:]
        raise RetrofitError(f"score: the daemon exited with {proc.returncode}: {' | '.join(tail)}")
    return messages


def _top1(report: dict[str, Any]) -> dict[str, Any]:
    groups = report.get("groups", report)
    return {g: v.get("top1") for g, v in groups.items() if isinstance(v, dict) and "top1" in v}


def _last_json(path: Path) -> dict[str, Any]:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _teacher_train(phase: TeacherPhase, out: Path) -> None:
    argv = ["teacher-train", "--config", str(phase.config), "--out", str(out), "--resume"]
    for o in phase.overrides:
        argv += ["--set", o]
    _model(argv)


def _file_text(path: Path) -> str:
    p = path if path.is_absolute() else REPO / path
    return p.read_text(encoding="utf-8") if p.is_file() else ""


def register(sub: Any) -> None:
    import argparse

    p = sub.add_parser(
        "chain",
        help="world → teacher → distil → export → quantize → bundle → daemon score, in cached resumable stages",
        description="Build a bundle from the procedural world end to end and score the daemon with it on the "
        "world's drive clip. Stages already done with the same settings are skipped; the teacher and the "
        "distillation resume from their checkpoints.",
    )
    p.add_argument("--config", type=Path, required=True, help="chain profile, e.g. models/configs/chain-ci.toml")
    p.add_argument("--work", type=Path, required=True, help="work directory: every stage's output and done.json")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--until", choices=STAGES, default="score", help="last stage to run (default: score)")
    p.add_argument("--force", action="append", choices=STAGES, default=[], help="rerun this stage even if done")

    def run(a: argparse.Namespace) -> int:
        import importlib

        cfg = load_chain_config(a.config)
        for module in ("torch", "open_clip", "timm"):  # before the first stage, not after the world is drawn
            importlib.import_module(module)
        pretrain = tuple(p.config for p in (*cfg.teacher.pretrain, *cfg.distill.pretrain))
        for stage_file in (*pretrain, cfg.teacher.config, cfg.distill.config, cfg.prompts_file):
            if not stage_file.is_file():
                raise ConfigError(f"{a.config}: no such file: {stage_file}")
        results = Chain(cfg, a.work, a.out).run(a.until, tuple(a.force))
        (a.work / "chain.json").write_text(json.dumps(results, indent=2) + "\n")
        sys.stdout.write(json.dumps({k: {"wall_s": v.get("wall_s")} for k, v in results.items()}) + "\n")
        return 0

    p.set_defaults(func=run)
