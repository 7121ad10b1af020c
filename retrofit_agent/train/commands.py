"""``retrofit-model`` subcommands that turn a distilled student into a bundle and measure it:
export, quantize, prompts, bundle, evaluate, cityscapes-index, bench.

Each ``add_*`` registers a subparser whose ``func`` takes the parsed namespace and returns
an exit code; user errors raise :class:`~retrofit_agent.contract.errors.RetrofitError` (one line,
exit 2), handled by the CLI's entry point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.images import find_images



def _images(folder: Path, count: int | None, what: str) -> list[np.ndarray]:
    import cv2

    if not folder.is_dir():
        raise ConfigError(f"{what}: not a directory: {folder}")
    paths = find_images(folder)[:count]
    frames = [f for f in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths) if f is not None]
    if not frames:
        raise ConfigError(f"{what}: no readable images in {folder}")
    return frames


# --------------------------------------------------------------------------- export


def load_student(path: Path):
    """The Student saved by ``retrofit-model distill`` (``<run>/student.pt``), ready for export."""
    import torch

    from retrofit_agent.train.student import Student

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise ConfigError(f"--checkpoint: cannot load {path}: {e}") from None
    arch, state = saved.get("architecture"), saved.get("student")
    if not isinstance(arch, dict) or not isinstance(state, dict):
        raise ConfigError(f"--checkpoint: {path} is not a student file from 'retrofit-model distill' (student.pt)")
    student = Student(arch["backbone"], embed_dim=int(arch["embed_dim"]), hidden_dim=int(arch["hidden_dim"]),
                      input_size=int(arch["input_size"]))
    student.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))})
    return student.eval(), saved


def _pretrained(tag: str | None) -> str | None:
    return None if tag is None or tag.strip().lower() in ("", "none") else tag


def _teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="ViT-L-14", help="open_clip model name")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, local checkpoint path, or none")
    p.add_argument("--seed", type=int, help="seeded random teacher (tests only; with --pretrained none)")


def cmd_export(a: argparse.Namespace) -> int:
    from retrofit_agent.train.export import export_onnx, onnx_metadata, parity, student_input_spec

    student, saved = load_student(a.checkpoint)
    teacher, fingerprint = saved.get("teacher"), saved.get("fingerprint")
    if not teacher or not fingerprint:
        raise ConfigError(f"--checkpoint: {a.checkpoint} names no teacher identity and fingerprint")
    spec = student_input_spec(student)
    meta = onnx_metadata(spec, student.embed_dim, teacher, fingerprint, a.version, f"{student.backbone_name}+mlp")
    # Trained only when distilled (steps > 0) from a pretrained teacher: a seeded teacher teaches nothing.
    meta["retrofit.trained"] = str(bool(saved.get("trained_from_pretrained_teacher")) and saved.get("steps", 0) > 0).lower()
    export_onnx(student, a.out, meta)
    diff = parity(student, a.out, _images(a.images, 16, "--images"), spec)
    print(f"exported {a.out}; parity torch vs onnxruntime fp32 on real images: max |diff| {diff:.2e} (limit 1e-4)")
    if diff > 1e-4:
        raise ConfigError(f"parity check failed: max |diff| {diff:.2e} > 1e-4")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="student checkpoint → ONNX fp32 with metadata and a parity check")
    p.add_argument("--checkpoint", type=Path, required=True, help="student.pt from a distill run directory")
    p.add_argument("--images", type=Path, required=True, help="folder of real images for the parity check")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------- quantize


def cmd_quantize(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.bundle import InputSpec, load_bank
    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.train.assemble import read_metadata
    from retrofit_agent.train.gate import compare, enforce
    from retrofit_agent.train.quantize import QuantSettings, quantize_int8, to_ort_format

    meta = read_metadata(a.fp32)
    spec = InputSpec.model_validate(json.loads(meta["retrofit.input_spec"]))
    pre = Preprocessor(spec)
    calib = [pre(f) for f in _images(a.calibration, a.count, "--calibration")]
    held = pre.batch(_images(a.held_out, a.held_out_count, "--held-out"))
    settings = QuantSettings(method=a.method, per_channel=not a.per_tensor, exclude=tuple(a.exclude))
    quantize_int8(a.fp32, a.out, spec.name, calib, settings)
    report = compare(a.fp32, a.out, held, load_bank(a.bank), (spec.name, meta["output_name"]), a.min_cosine, a.min_agreement)
    print(f"quantized {a.out} ({settings.describe(len(calib))}); {report.line()}")
    try:
        enforce(report, a.min_cosine, a.min_agreement, a.force)
    except Exception:
        a.out.unlink(missing_ok=True)  # a refused model is not left where a bundle step could pick it up
        raise
    if not report.passed:
        print("quality gate below thresholds: written anyway because of --force")
    if a.ort:
        print(f"ORT format: {to_ort_format(a.out)}")
    return 0


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="static int8 QDQ quantization with a quality gate")
    p.add_argument("--fp32", type=Path, required=True, help="ONNX model from 'export'")
    p.add_argument("--calibration", type=Path, required=True, help="folder of calibration images")
    p.add_argument("--count", type=int, default=256, help="calibration images to use")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument("--exclude", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="keep in float: comma list of first_conv, se, head and/or node-name regexes")
    p.add_argument("--held-out", type=Path, required=True, help="folder of held-out images for the gate")
    p.add_argument("--held-out-count", type=int, default=200)
    p.add_argument("--bank", type=Path, required=True, help="prompt bank for the zero-shot agreement")
    p.add_argument("--min-cosine", type=float, default=0.98)
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument("--force", action="store_true", help="write the model even below the gate's thresholds")
    p.add_argument("--ort", action="store_true", help="also write the .ort format for minimal onnxruntime builds")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_quantize)


# --------------------------------------------------------------------------- prompts, bundle


def cmd_prompts(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.prompts import load_prompts
    from retrofit_agent.train.bank import write_bank
    from retrofit_agent.train.teacher import Teacher

    prompts = load_prompts(a.prompts)
    teacher = Teacher(a.teacher, pretrained=_pretrained(a.pretrained), seed=a.seed)
    write_bank(a.out, teacher, prompts)
    n = sum(len(g.labels) for g in prompts.groups)
    print(f"wrote {a.out}: {n} labels from {teacher.identity} (fingerprint {teacher.fingerprint()})")
    return 0


def add_prompts(sub) -> None:
    p = sub.add_parser("prompts", help="prompts file → text-embedding bank with the teacher's text tower")
    p.add_argument("--prompts", type=Path, required=True)
    _teacher_arguments(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_prompts)


def cmd_bundle(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.bundle import Quantization
    from retrofit_agent.contract.prompts import load_prompts
    from retrofit_agent.train.assemble import assemble_bundle

    quant = Quantization(mode=a.quantization, per_channel=a.quantization != "none", calibration=a.calibration_note)
    assemble_bundle(a.out, a.model, a.bank, load_prompts(a.prompts), name=a.name, version=a.version,
                    trained=False if a.untrained else None, notice=a.notice, quantization=quant)
    print(f"bundle {a.out} verified")
    return 0


def add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="model + bank + prompts → a verified bundle directory")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--quantization", choices=("int8_static_qdq", "none"), default="int8_static_qdq")
    p.add_argument("--calibration-note", default=None, help="how the model was calibrated (for the manifest)")
    p.add_argument("--untrained", action="store_true",
                   help="mark the weights as not trained (default: what the exporter recorded)")
    p.add_argument("--notice", default="")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_bundle)


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.train import evaluate as ev
    from retrofit_agent.train.teacher import Teacher

    bundle = load_bundle(a.bundle)
    spec = bundle.manifest.model
    teacher = Teacher(a.teacher, pretrained=_pretrained(a.pretrained), seed=a.seed)
    if teacher.fingerprint() != bundle.manifest.embedding_space.fingerprint:
        raise ConfigError(f"--teacher {teacher.identity} is not the teacher of {a.bundle} "
                          f"({bundle.manifest.embedding_space.teacher})")
    tpre = _teacher_preprocess(teacher)

    def teacher_encode(frames):
        with torch.no_grad():
            return teacher.encode_image(torch.from_numpy(tpre.batch(frames))).numpy()

    encoders = {"teacher": teacher_encode,
                "student_int8": ev.onnx_encoder(bundle.model_path, spec.input, spec.input.name, spec.output.name)}
    if a.fp32:
        encoders["student_fp32"] = ev.onnx_encoder(a.fp32, spec.input, spec.input.name, spec.output.name)
    a.out.mkdir(parents=True, exist_ok=True)
    template = a.template
    if a.imagefolder:
        paths, targets, classes = ev.image_folder(a.imagefolder)
        text = teacher.encode_text([template.format(c.replace("_", " ")) for c in classes]).numpy()
        emb = {m: ev.encode_paths(paths, enc) for m, enc in encoders.items()}
        result = ev.evaluate_single_label(emb, text, targets)
        (a.out / "single_label.json").write_text(json.dumps(result, indent=2))
        for m, row in result["models"].items():
            print(f"{m:14} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))
    if a.multilabel:
        index = ev.read_index(a.multilabel)
        classes = a.classes or sorted({c for r in index for c in r["labels"]})
        labels = np.array([[c in r["labels"] for c in classes] for r in index], dtype=bool)
        text = teacher.encode_text([template.format(c) for c in classes]).numpy()
        emb = {m: ev.encode_paths([Path(r["image"]) for r in index], enc) for m, enc in encoders.items()}
        rows = ev.evaluate_multi_label(emb, text, labels, classes)
        (a.out / "multi_label.json").write_text(json.dumps(
            {m: {"mean_auroc": ev.mean_auroc(r), "classes": [vars(x) for x in r]} for m, r in rows.items()}, indent=2))
        table = ev.auroc_table(rows)
        (a.out / "multi_label.txt").write_text(table + "\n")
        ev.auroc_chart(rows, a.out / "auroc.png")
        print(table)
    return 0


def _teacher_preprocess(teacher):
    """The teacher's own view (its size, CLIP mean/std, centre crop) through the shared preprocessing."""
    from retrofit_agent.contract.bundle import InputSpec
    from retrofit_agent.contract.preprocess import Preprocessor

    return Preprocessor(InputSpec(name="image", height=teacher.image_size, width=teacher.image_size,
                                  mean=teacher.mean, std=teacher.std, resize="center_crop", interpolation="cubic"))


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot accuracy (ImageFolder) and per-class AUROC (multi-label index)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--fp32", type=Path, help="the student's fp32 ONNX, to report it beside int8")
    _teacher_arguments(p)
    p.add_argument("--imagefolder", type=Path, help="single-label ImageFolder root")
    p.add_argument("--multilabel", type=Path, help="JSON-lines index (e.g. from cityscapes-index)")
    p.add_argument("--classes", nargs="*", help="classes to score (default: all in the index)")
    p.add_argument("--template", default="a photo of a {}.")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_evaluate)


def cmd_cityscapes(a: argparse.Namespace) -> int:
    from retrofit_agent.train.evaluate import cityscapes_index, write_index

    index = cityscapes_index(a.root, a.split, a.min_pixels)
    if not index:
        raise ConfigError(f"no gtFine/{a.split}/*/*_gtFine_labelIds.png under {a.root}")
    write_index(index, a.out)
    print(f"wrote {a.out}: {len(index)} images")
    return 0


def add_cityscapes(sub) -> None:
    p = sub.add_parser("cityscapes-index", help="Cityscapes gtFine labelIds → multi-label image index")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--min-pixels", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_cityscapes)


def cmd_bench(a: argparse.Namespace) -> int:
    from retrofit_agent.train.bench import run_model_bench

    run_model_bench(a.teacher, a.bundle, a.runs, a.teacher_runs)
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and size: teacher image tower vs student fp32 vs int8")
    p.add_argument("--teacher", default="ViT-L-14")
    p.add_argument("--bundle", type=Path, default=Path("models/reference"))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--teacher-runs", type=int, default=8)
    p.set_defaults(func=cmd_bench)


def register(sub) -> None:
    for add in (add_export, add_quantize, add_prompts, add_bundle, add_evaluate, add_cityscapes, add_bench):
        add(sub)
