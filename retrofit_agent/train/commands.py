"""``retrofit-model`` subcommands that turn a distilled student into a bundle and measure it:
export, qat, quantize, prompts, bundle, evaluate, cityscapes-index, bench.

Each ``add_*`` registers a subparser whose ``func`` takes the parsed namespace and returns
an exit code; user errors raise :class:`~retrofit_agent.contract.errors.RetrofitError` (one line,
exit 2), handled by the CLI's entry point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import structlog

from retrofit_agent.contract.cliargs import existing_dir, existing_file, positive_int
from retrofit_agent.contract.errors import ConfigError, RetrofitError
from retrofit_agent.contract.images import find_images

log = structlog.get_logger("retrofit_model")


def _stage(command: str, stage: str, **context: object) -> None:
    """One progress line on stderr per stage of a command that takes more than a few seconds."""
    log.info(f"{command}_stage", stage=stage, **context)


def _onnx_metadata(path: Path, flag: str) -> dict[str, str]:
    from retrofit_agent.train.assemble import read_metadata  # needs onnx: the train extra

    try:
        return read_metadata(path)
    except RetrofitError:
        raise
    except Exception as e:  # protobuf's DecodeError and kin: whatever it is, it is not an ONNX model
        raise ConfigError(f"{flag}: {path} is not a readable ONNX model ({type(e).__name__}: {e})") from None


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
    from retrofit_agent.train.student import Student, read_student_file

    saved = read_student_file(path, "--checkpoint")
    arch, state = saved["architecture"], saved["student"]
    student = Student(
        arch["backbone"],
        embed_dim=int(arch["embed_dim"]),
        hidden_dim=int(arch["hidden_dim"]),
        input_size=int(arch["input_size"]),
    )
    student.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))})
    return student.eval(), saved


def _pretrained(tag: str | None) -> str | None:
    return None if tag is None or tag.strip().lower() in ("", "none") else tag


def _teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="ViT-L-14", help="open_clip model name (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag (downloaded once), local checkpoint path, or none (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, help="seeded random teacher (tests only; with --pretrained none)")


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT``) cannot be reached, or None when it can."""
    import os
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host} unreachable: {e.strerror or e}"
    return None


def load_teacher(model: str, pretrained: str | None, seed: int | None = None):
    """The frozen teacher of --teacher/--pretrained/--seed, or a ConfigError saying why not.

    A published tag needs its weights downloaded once. Offline, asking the hub anyway costs
    five retries and a hundred log lines; so reachability is checked first (3 s at most),
    and offline only the local cache is tried.
    """
    import logging
    import os
    import sys

    tag = _pretrained(pretrained)
    offline = None
    if tag is not None and not Path(tag).exists() and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
        offline = hub_unreachable()
        if offline:
            os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import time…
            constants = sys.modules.get("huggingface_hub.constants")
            if constants is not None:  # …and at call time, if it was already imported
                constants.HF_HUB_OFFLINE = True
    from retrofit_agent.train.teacher import Teacher  # torch, open_clip: the train extra

    if offline:
        logging.disable(logging.ERROR)  # open_clip logs the failed download; the line below says it better
    try:
        return Teacher(model, pretrained=tag, seed=seed)
    except (RuntimeError, ValueError, OSError) as e:  # open_clip: unknown model or tag, download or load failure
        if offline:
            raise ConfigError(
                f"--pretrained {tag}: cannot download the {model} weights ({offline}) and they are not in the "
                "local cache; give a local checkpoint instead (--pretrained /path/to/open_clip_pytorch_model.bin) "
                "or run once where the internet is reachable"
            ) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if " Available: " in reason:  # open_clip lists every model it knows
            reason = reason.split(" Available: ")[0] + " (open_clip.list_models() lists them)"
        raise ConfigError(f"--teacher {model} --pretrained {pretrained}: {reason}") from None
    finally:
        logging.disable(logging.NOTSET)


def cmd_export(a: argparse.Namespace) -> int:
    from retrofit_agent.train.export import dense_spec, export_onnx, onnx_metadata, parity, student_input_spec

    _stage("export", "loading the student", checkpoint=str(a.checkpoint))
    student, saved = load_student(a.checkpoint)
    trained_at = student.input_size
    if a.input_size is not None:
        # The backbone is fully convolutional and the head follows global pooling, so the same
        # weights run at any size: a student distilled at a low resolution on a CPU is exported
        # at the camera's 300 (timm's train/test resolution split; measure that it holds).
        student.input_size = (a.input_size, a.input_size)
    if a.dense:
        try:
            dense_spec(student)
        except ConfigError as e:
            raise ConfigError(f"--dense: {e}") from None
    frames = _images(a.images, 16, "--images")  # before minutes of export, not after
    teacher, fingerprint = saved.get("teacher"), saved.get("fingerprint")
    if not teacher or not fingerprint:
        raise ConfigError(f"--checkpoint: {a.checkpoint} names no teacher identity and fingerprint")
    spec = student_input_spec(student)
    meta = onnx_metadata(spec, student.embed_dim, teacher, fingerprint, a.version, f"{student.backbone_name}+mlp")
    # Trained only when distilled (steps > 0) from a pretrained teacher: a seeded teacher teaches nothing.
    meta["retrofit.trained"] = str(
        bool(saved.get("trained_from_pretrained_teacher")) and saved.get("steps", 0) > 0
    ).lower()
    _stage("export", "writing ONNX and running onnx.checker", out=str(a.out))
    export_onnx(student, a.out, meta, dense=a.dense)
    _stage("export", "parity check torch vs onnxruntime", images=str(a.images))
    diff = parity(student, a.out, frames, spec)
    cells = f" and cells ({'x'.join(map(str, student.cell_grid))} grid)" if a.dense else ""
    size = "x".join(map(str, student.input_size))
    if student.input_size != trained_at:
        size += f" (trained at {'x'.join(map(str, trained_at))})"
    print(
        f"exported {a.out} at {size}; parity torch vs onnxruntime fp32 on real images, embeddings{cells}: max |diff| "
        f"{diff:.2e} (limit 1e-4)"
    )
    if diff > 1e-4:
        raise ConfigError(f"parity check failed: max |diff| {diff:.2e} > 1e-4")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="student checkpoint → ONNX fp32 with metadata and a parity check")
    p.add_argument("--checkpoint", type=existing_file, required=True, help="student.pt from a distill run directory")
    p.add_argument("--images", type=existing_dir, required=True, help="folder of real images for the parity check")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write, e.g. build/student.fp32.onnx")
    p.add_argument("--version", default="0.1.0", help="model version recorded in the metadata (default: %(default)s)")
    p.add_argument(
        "--dense",
        action="store_true",
        help="also export cell_embeddings (N, H', W', D): the head on every cell of the last feature map, for regions",
    )
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=None,
        help="square input side to export at (default: the side the student was distilled at); the student is "
        "fully convolutional, so one distilled at 160 on a CPU can run at the camera's 300",
    )
    p.set_defaults(func=cmd_export)


def _input_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of pixels: {text!r}") from None
    if not 32 <= n <= 2048:
        raise argparse.ArgumentTypeError(f"{n} is outside 32..2048 pixels")
    return n


# --------------------------------------------------------------------------- qat


def cmd_qat(a: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.train.export import student_input_spec
    from retrofit_agent.train.qat import QatSettings, finetune, frame_batches

    _stage("qat", "loading the student", checkpoint=str(a.checkpoint))
    student, saved = load_student(a.checkpoint)
    if a.input_size is not None:
        student.input_size = (a.input_size, a.input_size)
    pre = Preprocessor(student_input_spec(student))
    frames = _images(a.images, a.count, "--images")
    held = torch.from_numpy(pre.batch(_images(a.held_out, a.held_out_count, "--held-out")))
    settings = QatSettings(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    metrics = (a.out / "metrics.jsonl").open("a")

    def on_metrics(m: dict) -> None:
        metrics.write(json.dumps(m) + "\n")
        metrics.flush()
        if m["kind"] == "eval" or m["step"] % 10 == 0:
            log.info("qat_step", **m)

    _stage("qat", "fine-tuning under fake int8", steps=a.steps, images=len(frames), out=str(a.out))
    try:
        student, summary = finetune(
            student,
            frame_batches(frames, pre.batch, a.batch_size),
            held,
            settings,
            a.out,
            student.has_cells,
            on_metrics,
        )
    finally:
        metrics.close()
        torch.set_num_threads(threads)
    record = {**summary, "settings": dataclasses.asdict(settings)}
    out = {**saved, "architecture": student.describe(), "student": student.state_dict(), "qat": record}
    tmp = a.out / "student.pt.tmp"
    torch.save(out, tmp)
    tmp.replace(a.out / "student.pt")
    first, last = summary["first"], summary["last"]
    cells = (
        f", cells {first['sim_int8_cell_cosine']:.3f} → {last['sim_int8_cell_cosine']:.3f}"
        if "sim_int8_cell_cosine" in last
        else ""
    )
    print(
        f"qat: {summary['steps']} steps under {summary['quantizers']} fake int8 quantizers; simulated int8 vs fp32 "
        f"mean cosine on {len(held)} held-out pictures {first['sim_int8_cosine']:.3f} → {last['sim_int8_cosine']:.3f}"
        f"{cells}; wrote {a.out / 'student.pt'} (export and quantize it as any student)"
    )
    return 0


def add_qat(sub) -> None:
    p = sub.add_parser(
        "qat",
        help="quantization-aware fine-tune: the student learns to match its own fp32 outputs under fake int8",
        description="Fine-tune a distilled student under fake uint8 quantization of every tensor onnxruntime's "
        "static QDQ quantizes, against a frozen copy of itself, so that 'quantize' passes its gate where post-"
        "training quantization alone does not. Resumable: rerun with the same --out.",
    )
    p.add_argument("--checkpoint", type=existing_file, required=True, help="student.pt from a distill run directory")
    p.add_argument("--images", type=existing_dir, required=True, help="folder of training pictures")
    p.add_argument(
        "--count", type=positive_int, default=2000, help="pictures to draw batches from (default: %(default)s)"
    )
    p.add_argument("--held-out", type=existing_dir, required=True, help="folder of held-out pictures for the eval")
    p.add_argument("--held-out-count", type=positive_int, default=64, help="(default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine decay (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="batch order and mirroring (default: %(default)s)")
    p.add_argument(
        "--input-size", type=_input_size, default=None, help="square side to train at (default: the student's)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="run directory: student.pt, metrics.jsonl, checkpoint.pt")
    p.set_defaults(func=cmd_qat)


# --------------------------------------------------------------------------- quantize


def cmd_quantize(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.bundle import InputSpec, load_bank
    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.train.gate import compare, enforce
    from retrofit_agent.train.quantize import QuantSettings, quantize_int8, to_ort_format

    meta = _onnx_metadata(a.fp32, "--fp32")
    spec = InputSpec.model_validate(json.loads(meta["retrofit.input_spec"]))
    pre = Preprocessor(spec)
    calib = [pre(f) for f in _images(a.calibration, a.count, "--calibration")]
    held = pre.batch(_images(a.held_out, a.held_out_count, "--held-out"))
    settings = QuantSettings(method=a.method, per_channel=not a.per_tensor, exclude=tuple(a.exclude))
    quantize_int8(a.fp32, a.out, spec.name, calib, settings)
    report = compare(a.fp32, a.out, held, load_bank(a.bank), a.min_cosine, a.min_agreement)
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
    p.add_argument("--fp32", type=existing_file, required=True, help="ONNX model from 'export'")
    p.add_argument("--calibration", type=existing_dir, required=True, help="folder of calibration images")
    p.add_argument("--count", type=positive_int, default=256, help="calibration images to use (default: %(default)s)")
    p.add_argument(
        "--method",
        choices=("minmax", "minmax-mean", "entropy", "percentile"),
        default="minmax",
        help="calibration method: minmax takes each tensor's extremes over all calibration pictures, minmax-mean "
        "the mean of each picture's own min and max (what 'qat' trains under) (default: %(default)s)",
    )
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    p.add_argument(
        "--exclude",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="keep in float: comma list of first_conv, se, head and/or node-name regexes",
    )
    p.add_argument("--held-out", type=existing_dir, required=True, help="folder of held-out images for the gate")
    p.add_argument(
        "--held-out-count", type=positive_int, default=200, help="held-out images to compare (default: %(default)s)"
    )
    p.add_argument("--bank", type=existing_file, required=True, help="prompt bank for the zero-shot agreement")
    p.add_argument(
        "--min-cosine",
        type=float,
        default=0.98,
        help="gate: least mean int8↔fp32 embedding cosine (default: %(default)s)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.95,
        help="gate: least zero-shot top-1 agreement int8 vs fp32 (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="write the model even below the gate's thresholds")
    p.add_argument("--ort", action="store_true", help="also write the .ort format for minimal onnxruntime builds")
    p.add_argument("--out", type=Path, required=True, help="int8 ONNX file to write, e.g. build/student.int8.onnx")
    p.set_defaults(func=cmd_quantize)


# --------------------------------------------------------------------------- prompts, bundle


def cmd_prompts(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.prompts import load_prompts

    prompts = load_prompts(a.prompts)
    teacher = load_teacher(a.teacher, a.pretrained, a.seed)  # first: it checks the hub before torch loads
    from retrofit_agent.train.bank import write_bank

    write_bank(a.out, teacher, prompts)
    n = sum(len(g.labels) for g in prompts.groups)
    print(f"wrote {a.out}: {n} labels from {teacher.identity} (fingerprint {teacher.fingerprint()})")
    return 0


def add_prompts(sub) -> None:
    p = sub.add_parser("prompts", help="prompts file → text-embedding bank with the teacher's text tower")
    p.add_argument(
        "--prompts", type=existing_file, required=True, help="prompts file (TOML), e.g. models/prompts/automotive.toml"
    )
    _teacher_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="bank file to write (.npz)")
    p.set_defaults(func=cmd_prompts)


def cmd_bundle(a: argparse.Namespace) -> int:
    from retrofit_agent.contract.bundle import Quantization, load_bank
    from retrofit_agent.contract.prompts import load_prompts
    from retrofit_agent.train.assemble import assemble_bundle

    prompts = load_prompts(a.prompts)
    load_bank(a.bank)  # refuse a broken bank or model with one line before copying anything
    _onnx_metadata(a.model, "--model")
    quant = Quantization(mode=a.quantization, per_channel=a.quantization != "none", calibration=a.calibration_note)
    variants = None
    if a.variants:
        variants = _bundle_variants(a, quant)
        quant = variants[0].quantization
    assemble_bundle(
        a.out,
        a.model,
        a.bank,
        prompts,
        name=a.name,
        version=a.version,
        trained=False if a.untrained else None,
        notice=a.notice,
        quantization=quant,
        variants=variants,
    )
    print(f"bundle {a.out} verified")
    return 0


def _bundle_variants(a: argparse.Namespace, int8_quant):
    """--variants int8,fp32: --model is the int8 model, --fp32 the float one; each gated against fp32."""
    import json

    from retrofit_agent.contract.bundle import InputSpec, Quantization, load_bank
    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.contract.sample import read_clip_frames
    from retrofit_agent.train import variants as var

    names = var.parse_variants(a.variants)
    if a.fp32 is None:
        raise ConfigError("--variants needs --fp32 (the float model from 'export'): the gate compares with it")
    meta = _onnx_metadata(a.fp32, "--fp32")
    pre = Preprocessor(InputSpec.model_validate(json.loads(meta["retrofit.input_spec"])))
    held = pre.batch(
        _images(a.held_out, a.held_out_count, "--held-out")
        if a.held_out
        else read_clip_frames(a.held_out_clip, limit=a.held_out_count)
    )
    models = {n: a.fp32 if n == "fp32" else a.model for n in names}
    quants = {"int8": int8_quant, "fp32": Quantization(mode="none")}
    specs = var.build_variants(a.out, models, quants, held, load_bank(a.bank), (a.min_cosine, a.min_agreement))
    for line in var.size_lines(specs):
        print(line)
    return specs


def add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="model + bank + prompts → a verified bundle directory")
    p.add_argument("--model", type=existing_file, required=True, help="ONNX model (from 'quantize' or 'export')")
    p.add_argument("--bank", type=existing_file, required=True, help="text bank (from 'prompts')")
    p.add_argument("--prompts", type=existing_file, required=True, help="the prompts file the bank was built from")
    p.add_argument("--name", required=True, help="bundle name, e.g. clip4retrofit-b3")
    p.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    p.add_argument(
        "--quantization",
        choices=("int8_static_qdq", "none"),
        default="int8_static_qdq",
        help="how the model was quantized, for the manifest (default: %(default)s)",
    )
    p.add_argument("--calibration-note", default=None, help="how the model was calibrated (for the manifest)")
    p.add_argument(
        "--untrained", action="store_true", help="mark the weights as not trained (default: what the exporter recorded)"
    )
    p.add_argument("--notice", default="", help="caveats for the manifest, logged by the daemon at start-up")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument(
        "--variants",
        default=None,
        help="encoders to carry, e.g. int8,fp32 (the first is the default; the daemon times them at "
        "start-up); --model is the int8 one, --fp32 the float one",
    )
    p.add_argument("--fp32", type=existing_file, default=None, help="the float model from 'export' (with --variants)")
    p.add_argument(
        "--held-out",
        type=existing_dir,
        default=None,
        help="folder of held-out images for the variants' gate (default: --held-out-clip)",
    )
    p.add_argument(
        "--held-out-clip",
        type=existing_file,
        default=Path("models/sample/drive.mp4"),
        help="video whose frames the gate compares on, without --held-out (default: %(default)s)",
    )
    p.add_argument("--held-out-count", type=positive_int, default=64, help="held-out images (default: %(default)s)")
    p.add_argument("--min-cosine", type=float, default=0.98, help="gate: mean cosine with fp32 (default: %(default)s)")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.95,
        help="gate: zero-shot top-1 agreement with fp32 (default: %(default)s)",
    )
    p.set_defaults(func=cmd_bundle)


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(a: argparse.Namespace) -> int:
    if not (a.imagefolder or a.multilabel or a.world or a.regions):
        raise ConfigError(
            "nothing to evaluate: give --imagefolder (zero-shot accuracy), --multilabel (AUROC), --world "
            "(per-group top-1 on world pictures) and/or --regions"
        )
    import torch

    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.train import evaluate as ev

    bundle = load_bundle(a.bundle)
    teacher = load_teacher(a.teacher, a.pretrained, a.seed)
    if teacher.fingerprint() != bundle.manifest.embedding_space.fingerprint:
        raise ConfigError(
            f"--teacher {teacher.identity} is not the teacher of {a.bundle} ({bundle.manifest.embedding_space.teacher})"
        )
    tpre = _teacher_preprocess(teacher)

    def teacher_encode(frames):
        with torch.no_grad():
            return teacher.encode_image(torch.from_numpy(tpre.batch(frames)).to(teacher.device)).cpu().numpy()

    encoders = {"teacher": teacher_encode, "student_int8": ev.onnx_encoder(bundle.model_path)}
    if a.fp32:
        encoders["student_fp32"] = ev.onnx_encoder(a.fp32)
    a.out.mkdir(parents=True, exist_ok=True)
    template = a.template
    if a.imagefolder:
        paths, targets, classes = ev.image_folder(a.imagefolder)
        text = teacher.encode_text([template.format(c.replace("_", " ")) for c in classes]).cpu().numpy()
        emb = {m: ev.encode_paths(paths, enc) for m, enc in encoders.items()}
        result = ev.evaluate_single_label(emb, text, targets)
        (a.out / "single_label.json").write_text(json.dumps(result, indent=2))
        for m, row in result["models"].items():
            print(f"{m:14} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))
    if a.multilabel:
        index = ev.read_index(a.multilabel)
        classes = a.classes or sorted({c for r in index for c in r["labels"]})
        labels = np.array([[c in r["labels"] for c in classes] for r in index], dtype=bool)
        text = teacher.encode_text([template.format(c) for c in classes]).cpu().numpy()
        emb = {m: ev.encode_paths([Path(r["image"]) for r in index], enc) for m, enc in encoders.items()}
        rows = ev.evaluate_multi_label(emb, text, labels, classes)
        (a.out / "multi_label.json").write_text(
            json.dumps(
                {m: {"mean_auroc": ev.mean_auroc(r), "classes": [vars(x) for x in r]} for m, r in rows.items()},
                indent=2,
            )
        )
        table = ev.auroc_table(rows)
        (a.out / "multi_label.txt").write_text(table + "\n")
        ev.auroc_chart(rows, a.out / "auroc.png")
        print(table)
    if a.world:
        try:
            records, frames = ev.read_world(a.world, a.limit)
        except ValueError as e:
            raise ConfigError(f"--world: {e}") from None
        emb = {
            m: np.concatenate([enc(frames[i : i + 16]) for i in range(0, len(frames), 16)])
            for m, enc in encoders.items()
        }
        order = ["teacher", "student_fp32", "student_int8"]
        emb = {m: emb[m] for m in order if m in emb}
        world = ev.evaluate_world(emb, bundle.bank.embeddings, bundle.bank.keys, [r.labels for r in records])
        table = ev.world_table(world, a.goal)
        (a.out / "world.json").write_text(json.dumps({"pictures": len(records), "models": world}, indent=2))
        (a.out / "world.txt").write_text(table + "\n")
        ev.bar_chart(
            {m: {g: v for g, v in r.items() if "/" not in g} for m, r in world.items()}, a.out / "world.png", a.goal
        )
        print(table)
    if a.regions:
        _evaluate_regions(a, bundle, teacher, tpre)
    return 0


def _evaluate_regions(a: argparse.Namespace, bundle, teacher, tpre) -> None:
    """``--regions``: pointing game, box recall and false regions against the world's boxes."""
    import torch

    from retrofit_agent.contract.embedder import Embedder
    from retrofit_agent.contract.preprocess import Preprocessor
    from retrofit_agent.contract.regions import RegionFinder
    from retrofit_agent.train import evaluate as ev
    from retrofit_agent.train import regions_eval as rv

    m = bundle.manifest
    keys = [f"{g.name}.{lab.name}" for g in m.bank.groups for lab in g.labels if lab.localize]
    if not keys:
        raise ConfigError(f"--regions: {a.bundle} marks no label 'localize = true' (see the prompts file)")
    teacher.check_dense()  # a tower without per-patch embeddings: one line, before any picture is read

    def onnx_model(name: str, path: Path) -> rv.CellModel:
        embedder = Embedder.from_onnx(path)
        if not embedder.has_cells:
            raise ConfigError(f"--regions: {path} has no cell_embeddings output (export it with --dense)")
        pre = Preprocessor(embedder.spec.input)

        def cells(frames: list[np.ndarray]) -> np.ndarray:
            return np.stack([embedder.embed_with_cells(pre(f))[1] for f in frames])

        return rv.CellModel(name, embedder.spec.input, cells)

    def teacher_cells(frames: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(tpre.batch(frames)).to(teacher.device)
            return teacher.encode_dense(x).float().cpu().numpy()

    try:
        records, frames = ev.read_world(a.regions, a.limit)
    except ValueError as e:
        raise ConfigError(f"--regions: {e}") from None
    models = [rv.CellModel("teacher", tpre.spec, teacher_cells)]
    if a.fp32:
        models.append(onnx_model("student_fp32", a.fp32))
    models.append(onnx_model("student_int8", bundle.model_path))

    def finder_for(spec):
        return RegionFinder(bundle.bank, m.bank, spec, threshold=a.regions_threshold, max_labels=len(keys), labels=keys)

    results, found = {}, {}
    for model in models:
        results[model.name], found[model.name] = rv.score_model(model, records, frames, keys, finder_for)
    table = rv.regions_table(results)
    (a.out / "regions.txt").write_text(table + "\n")
    (a.out / "regions.json").write_text(
        json.dumps(
            {
                "pictures": len(records),
                "threshold": a.regions_threshold,
                "iou_hit": rv.IOU_HIT,
                "models": {n: {k: s.as_dict() for k, s in r.items()} for n, r in results.items()},
            },
            indent=2,
        )
    )
    rv.draw_regions(frames, records, found, keys, a.out / "regions.png")
    print(table)


def _teacher_preprocess(teacher):
    """The teacher's own view (its size, CLIP mean/std, centre crop) through the shared preprocessing."""
    from retrofit_agent.contract.bundle import InputSpec
    from retrofit_agent.contract.preprocess import Preprocessor

    return Preprocessor(
        InputSpec(
            name="image",
            height=teacher.image_size,
            width=teacher.image_size,
            mean=teacher.mean,
            std=teacher.std,
            resize="center_crop",
            interpolation="cubic",
        )
    )


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="zero-shot accuracy (ImageFolder) and per-class AUROC (multi-label index)")
    p.add_argument("--bundle", type=existing_dir, required=True, help="bundle directory to evaluate")
    p.add_argument("--fp32", type=existing_file, help="the student's fp32 ONNX, to report it beside int8")
    _teacher_arguments(p)
    p.add_argument("--imagefolder", type=existing_dir, help="single-label ImageFolder root")
    p.add_argument("--multilabel", type=existing_file, help="JSON-lines index (e.g. from cityscapes-index)")
    p.add_argument("--classes", nargs="*", help="classes to score (default: all in the index)")
    p.add_argument("--template", default="a photo of a {}.", help="text prompt per class (default: %(default)r)")
    p.add_argument(
        "--world",
        type=existing_dir,
        help="a 'retrofit-model world images' folder: per-group top-1 of teacher and students, as the camera decides",
    )
    p.add_argument("--goal", type=float, help="with --world: mark groups under this top-1 (e.g. 0.9)")
    p.add_argument(
        "--regions",
        type=existing_dir,
        help="a 'retrofit-model world images' folder: score regions of localized labels against its boxes",
    )
    p.add_argument("--regions-threshold", type=float, default=0.5, help="cell probability for a region (default 0.5)")
    p.add_argument("--limit", type=int, help="with --world/--regions: only the first N pictures")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON, table and chart")
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
    p.add_argument("--root", type=existing_dir, required=True, help="Cityscapes root (with gtFine/ and leftImg8bit/)")
    p.add_argument("--split", default="val", help="train, val or test (default: %(default)s)")
    p.add_argument(
        "--min-pixels",
        type=positive_int,
        default=1,
        help="a class counts as present from this many pixels (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON-lines index to write")
    p.set_defaults(func=cmd_cityscapes)


def cmd_bench(a: argparse.Namespace) -> int:
    """``bench.run_model_bench`` with a progress line per stage (it runs for minutes)."""
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.train.bench import run_model_bench

    load_bundle(a.bundle)
    _known_teacher(a.teacher)  # before minutes of export, not after
    run_model_bench(a.teacher, a.bundle, a.runs, a.teacher_runs, progress=lambda line: _stage("bench", line))
    return 0


def _known_teacher(name: str) -> None:
    import open_clip

    from retrofit_agent.train.teacher import register_local_configs

    register_local_configs()
    if name not in open_clip.list_models():
        raise ConfigError(f"--teacher: unknown open_clip model {name!r} (open_clip.list_models() lists them)")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and size: teacher image tower vs student fp32 vs int8")
    p.add_argument(
        "--teacher", default="ViT-L-14", help="open_clip model whose image tower is timed (default: %(default)s)"
    )
    p.add_argument(
        "--bundle",
        type=existing_dir,
        default=Path("models/reference"),
        help="bundle whose int8 model is timed (default: %(default)s)",
    )
    p.add_argument("--runs", type=positive_int, default=20, help="timed runs per student model (default: %(default)s)")
    p.add_argument(
        "--teacher-runs",
        type=positive_int,
        default=8,
        help="timed runs of the teacher's image tower (default: %(default)s)",
    )
    p.set_defaults(func=cmd_bench)


def register(sub) -> None:
    for add in (add_export, add_qat, add_quantize, add_prompts, add_bundle, add_evaluate, add_cityscapes, add_bench):
        add(sub)
