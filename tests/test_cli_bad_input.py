"""Every subcommand of both programs, fed bad input: one `<prog>: error: …` line, a non-zero
exit, no traceback, and at most one log line before it.

Each case is its own subprocess (a second or two), so the table runs in parallel under
pytest-xdist and a new subcommand without cases fails ``test_every_subcommand_has_cases``.
``retrofit-agent`` runs with torch made unimportable, as on a vehicle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from helpers import REPO, SEEDED, agent_command, free_port

pytestmark = pytest.mark.integration

_TRAIN_BLOCKED = ("torch", "torchvision", "timm", "open_clip", "onnx")
_MODEL = (
    "import sys\n"
    "for m in sys.argv[1].split(','):\n"
    "    if m: sys.modules[m] = None\n"
    "from retrofit_agent.train.cli import main\n"
    "raise SystemExit(main(sys.argv[2:]))\n"
)


def model_command(*args: str, block: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-c", _MODEL, ",".join(block), *args]


@dataclass(frozen=True)
class Case:
    prog: str  # "agent" or "model"
    command: str  # the subcommand it exercises ("run" for the daemon itself, "-" for the program)
    args: tuple[str, ...]
    expect: str  # a piece of the error line
    code: int = 2
    log_lines: int = 0  # log lines allowed before the error line
    block: tuple[str, ...] = ()  # modules made unimportable (retrofit-model only)
    env: tuple[tuple[str, str], ...] = ()
    marks: tuple = field(default=())


def A(command: str, *args: str, expect: str, **kw) -> Case:
    argv = args if command in ("run", "-") else (command, *args)
    return Case("agent", command, argv, expect, **kw)


def M(command: str, *args: str, expect: str, **kw) -> Case:
    argv = args if command == "-" else (command, *args)
    return Case("model", command, argv, expect, **kw)


TRAIN = (pytest.mark.train, pytest.mark.slow)


def _agent_subcommands() -> set[str]:
    from retrofit_agent.daemon.cli import SUBCOMMANDS

    return set(SUBCOMMANDS)


def _model_subcommands() -> set[str]:
    import argparse

    from retrofit_agent.train.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def _has_world() -> bool:
    return "world" in _model_subcommands()


# `world` (the procedural world renderer) is being added alongside this test.
WORLD = (pytest.mark.skipif(not _has_world(), reason="no 'retrofit-model world' in this tree"),)

# R: the seeded bundle (tests/fixtures), whose bank comes from a seeded retrofit-tiny-clip.
R, P = "tests/fixtures/seeded-bundle", "models/prompts/automotive.toml"

# qat with every path it needs present, and a checkpoint that is not a student file.
QAT_GARBAGE = ("qat", "--checkpoint", "{garbage}", "--images", "{empty}", "--held-out", "{empty}", "--out", "{tmp}/q")

CASES = [
    # ------------------------------------------------------------------ retrofit-agent
    A("-", "tial", expect="unknown command 'tial'"),
    A("run", "--no-such-flag", expect="unrecognized arguments: --no-such-flag"),
    A("run", "--threads", "two", expect="argument --threads: invalid int value: 'two'"),
    A("run", "--log-format", "xml", expect="argument --log-format: invalid choice: 'xml'"),
    A("run", "--config", "{tmp}/missing.toml", expect="config file not found"),
    A("run", "--config", "{bad_toml}", expect="not valid TOML"),
    A("run", "--max-frames", "0", expect="max_frames: Input should be greater than 0"),
    A("run", "--publish", "bogus", expect="publish.endpoint"),
    A("run", "--metrics-address", "nonsense", expect="metrics.address"),
    A("run", "--bundle", "{tmp}/no-bundle", expect="bundle directory not found"),
    A("run", "--bundle", "{empty}", expect="no manifest.json"),
    A("run", "--camera", "{tmp}/missing.mp4", expect="video file not found"),
    A("run", "--camera", "videotestsrc ! appsink", expect="GStreamer"),
    A("run", "--config", "{campaign_toml}", expect="unknown tag 'weather.hail'"),
    A(
        "run",
        "--bundle",
        "{tampered}",
        "--camera",
        "{clip}",
        "--publish",
        "ipc://{tmp}/a.sock",
        "--metrics-address",
        "127.0.0.1:0",
        expect="sha256 mismatch",
        log_lines=1,
    ),
    A(
        "run",
        "--camera",
        "{clip}",
        "--publish",
        "ipc://{tmp}/b.sock",
        "--metrics-address",
        "127.0.0.1:{busy_port}",
        expect="127.0.0.1:{busy_port}",
        log_lines=1,
    ),
    A("tail", "--endpoint", "bogus", expect="--endpoint: cannot connect to 'bogus'"),
    A("uplink", "--mqtt", "http://broker:1883", expect="mqtt.url"),
    A(
        "uplink",
        "--journal",
        "/proc/uplink-journal",
        expect="journal.directory: cannot use /proc/uplink-journal",
        log_lines=1,
    ),
    A("uplink", "--tags", "some", expect="argument --tags: invalid choice: 'some'"),
    A("tail", "--count", "0", expect="argument --count: expected a whole number > 0"),
    A("tail", "--timeout", "soon", expect="argument --timeout: expected a number > 0"),
    A("tail", "--topic", "gossip", expect="argument --topic: invalid choice: 'gossip'"),
    A("tail", "--curve-client-cert", "{tmp}/me.key_secret", expect="go together"),
    A(
        "tail",
        "--curve-client-cert",
        "{tmp}/me.key_secret",
        "--curve-server-key",
        "{tmp}/cam.key",
        expect="cannot read certificate",
    ),
    A("tail", "--legend", "{tmp}/no-bundle", expect="bundle directory not found"),
    A("schema", "--output", "{tmp}/no-dir/schema.json", expect="--output: cannot write"),
    A("schema", "extra", expect="unrecognized arguments: extra"),
    A("keys", expect="the following arguments are required: kind, directory"),
    A("keys", "rsa", "{tmp}/keys", expect="argument kind: invalid choice: 'rsa'"),
    A("keys", "curve", "{tmp}/keys", "--name", "../escape", expect="argument --name"),
    A("keys", "curve", "{existing_keys}", "--name", "taken", expect="already exists; refusing to overwrite"),
    A("keys", "signing", "{existing_keys}", "--name", "taken", expect="already exists; refusing to overwrite"),
    A("keys", "signing", "{bad_toml}", expect="cannot create key directory"),
    A("sign-bundle", R, expect="the following arguments are required: --key"),
    A("sign-bundle", "{tmp}/no-bundle", "--key", "{tmp}/k.pem", expect="bundle directory not found"),
    A("sign-bundle", R, "--key", "{tmp}/missing.pem", expect="No such file or directory"),
    A("sign-bundle", R, "--key", "{garbage}", expect="cannot sign"),
    A("sample-clip", expect="the following arguments are required: output"),
    A("sample-clip", "{tmp}/c.mp4", "--frames", "0", expect="argument --frames: expected a whole number > 0"),
    A("sample-clip", "{tmp}/c.mp4", "--fps", "-5", expect="argument --fps: expected a number > 0"),
    A("sample-clip", "{tmp}/clip.unknownext", expect="argument output: expected a .mp4 or .avi file name"),
    A("sample-clip", "{bad_toml}/c.mp4", expect="cannot write"),
    # ------------------------------------------------------------------ retrofit-model
    M("-", expect="the following arguments are required: COMMAND"),
    M("-", "nope", expect="invalid choice: 'nope'"),
    M("-", "--log-format", "xml", "bench", expect="argument --log-format: invalid choice: 'xml'"),
    M("distill", "--config", "{tmp}/missing.toml", expect="config file not found"),
    M("distill", "--set", "foo", expect="override 'foo' must look like section.key=value"),
    M("distill", "--set", "optim.lr=abc", expect="optim.lr: Input should be a valid number"),
    M("distill", "--max-steps", "-1", "--print-config", expect="optim.max_steps: Input should be greater than 0"),
    M("distill", expect="data.train: no training images configured"),
    M(
        "distill",
        "--config",
        "models/configs/tiny.toml",
        "--set",
        'data.train=["{tmp}/no-images"]',
        "--max-steps",
        "1",
        "--out",
        "{tmp}/run",
        expect="does not exist",
        log_lines=1,
        marks=TRAIN,
    ),
    M(
        "distill",
        "--config",
        "models/configs/tiny.toml",
        "--set",
        'data.train=["{empty}"]',
        "--out",
        "{tmp}/run",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M("synth-images", expect="the following arguments are required: --out"),
    M("synth-images", "--out", "{tmp}/s", "--count", "0", expect="--count must be > 0"),
    M("synth-images", "--out", "{bad_toml}/s", "--count", "1", expect="Not a directory"),
    M(
        "export",
        "--checkpoint",
        "{tmp}/missing.pt",
        "--images",
        "{empty}",
        "--out",
        "{tmp}/x.onnx",
        expect="argument --checkpoint: no such file",
    ),
    M(
        "export",
        "--checkpoint",
        "{garbage}",
        "--images",
        "{tmp}/no-dir",
        "--out",
        "{tmp}/x.onnx",
        expect="argument --images: no such directory",
    ),
    M(
        "export",
        "--checkpoint",
        "{garbage}",
        "--images",
        "{empty}",
        "--out",
        "{tmp}/x.onnx",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M(
        "export",
        "--checkpoint",
        "{garbage}",
        "--images",
        "{empty}",
        "--out",
        "{tmp}/x.onnx",
        expect="--checkpoint: cannot load",
        log_lines=1,
        marks=TRAIN,
    ),  # after its first progress line
    M(
        "quantize",
        "--fp32",
        "{tmp}/missing.onnx",
        "--calibration",
        "{empty}",
        "--held-out",
        "{empty}",
        "--bank",
        f"{R}/bank.npz",
        "--out",
        "{tmp}/q.onnx",
        expect="argument --fp32: no such file",
    ),
    M(
        "quantize",
        "--fp32",
        f"{R}/student.int8.onnx",
        "--calibration",
        "{empty}",
        "--held-out",
        "{empty}",
        "--bank",
        f"{R}/bank.npz",
        "--count",
        "0",
        "--out",
        "{tmp}/q.onnx",
        expect="argument --count",
    ),
    M(
        "quantize",
        "--fp32",
        "{garbage}",
        "--calibration",
        "{empty}",
        "--held-out",
        "{empty}",
        "--bank",
        f"{R}/bank.npz",
        "--out",
        "{tmp}/q.onnx",
        expect="--fp32: {garbage} is not a readable ONNX model",
    ),
    M(
        "quantize",
        "--fp32",
        "{garbage}",
        "--calibration",
        "{empty}",
        "--held-out",
        "{empty}",
        "--bank",
        f"{R}/bank.npz",
        "--out",
        "{tmp}/q.onnx",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M("prompts", "--prompts", "{empty}", "--out", "{tmp}/b.npz", expect="argument --prompts: is a directory"),
    M("prompts", "--prompts", "{bad_toml}", "--out", "{tmp}/b.npz", expect="is not valid TOML"),
    M("prompts", "--prompts", "{garbage}", "--out", "{tmp}/b.npz", expect="is not UTF-8 text"),
    M("prompts", "--prompts", "{no_templates}", "--out", "{tmp}/b.npz", expect="templates: Field required"),
    M("prompts", "--prompts", P, "--out", "{tmp}/b.npz", expect="needs the train extra", block=_TRAIN_BLOCKED),
    M(
        "prompts",
        "--prompts",
        P,
        "--out",
        "{tmp}/b.npz",
        "--teacher",
        "NoSuchModel",
        "--pretrained",
        "none",
        expect="--teacher NoSuchModel --pretrained none: Model config for 'NoSuchModel' not found",
        marks=TRAIN,
    ),
    # Offline for sure (the hub's address refuses at once) and with an empty cache, so that a
    # machine with the internet never starts a 600 MB download here.
    M(
        "prompts",
        "--prompts",
        P,
        "--out",
        "{tmp}/b.npz",
        "--teacher",
        "ViT-B-32",
        "--pretrained",
        "openai",
        expect="cannot download the ViT-B-32 weights",
        marks=TRAIN,
        env=(("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HOME", "{tmp}/hf"), ("XDG_CACHE_HOME", "{tmp}/cache")),
    ),
    M(
        "bundle",
        "--model",
        f"{R}/student.int8.onnx",
        "--bank",
        "missing.npz",
        "--prompts",
        P,
        "--name",
        "x",
        "--version",
        "1",
        "--out",
        "{tmp}/bo",
        expect="argument --bank: no such file: missing.npz",
    ),
    M(
        "bundle",
        "--model",
        f"{R}/student.int8.onnx",
        "--bank",
        "{garbage}",
        "--prompts",
        P,
        "--name",
        "x",
        "--version",
        "1",
        "--out",
        "{tmp}/bo",
        expect="not a readable .npz file (not a zip archive",
    ),
    M(
        "bundle",
        "--model",
        "{garbage}",
        "--bank",
        f"{R}/bank.npz",
        "--prompts",
        P,
        "--name",
        "x",
        "--version",
        "1",
        "--out",
        "{tmp}/bo",
        expect="--model: {garbage} is not a readable ONNX model",
    ),
    M(
        "bundle",
        "--model",
        f"{R}/student.int8.onnx",
        "--bank",
        f"{R}/bank.npz",
        "--prompts",
        P,
        "--name",
        "x",
        "--version",
        "1",
        "--out",
        "{tmp}/bo",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M(
        "bundle",
        "--model",
        f"{R}/student.int8.onnx",
        "--bank",
        f"{R}/bank.npz",
        "--prompts",
        P,
        "--out",
        "{tmp}/bo",
        expect="the following arguments are required: --name, --version",
    ),
    M("evaluate", "--bundle", R, "--out", "{tmp}/ev", expect="nothing to evaluate"),
    M(
        "evaluate",
        *("--bundle", R, "--teacher", "retrofit-tiny-clip", "--pretrained", "none", "--seed", "0"),
        *("--world", "{empty}", "--out", "{tmp}/ev"),
        expect="--world: ",
        log_lines=1,
    ),
    M(
        "evaluate",
        *("--bundle", R, "--teacher", "retrofit-tiny-clip", "--pretrained", "none", "--seed", "0"),
        *("--regions", "{tmp}/no-world", "--out", "{tmp}/ev"),
        expect="argument --regions: no such directory",
    ),
    M(
        "evaluate",
        "--bundle",
        "{tmp}/no-bundle",
        "--imagefolder",
        "{empty}",
        "--out",
        "{tmp}/ev",
        expect="argument --bundle: no such directory",
    ),
    M(
        "evaluate",
        "--bundle",
        R,
        "--multilabel",
        "{tmp}/missing.jsonl",
        "--out",
        "{tmp}/ev",
        expect="argument --multilabel: no such file",
    ),
    M(
        "evaluate",
        "--bundle",
        R,
        "--imagefolder",
        "{empty}",
        "--out",
        "{tmp}/ev",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M("cityscapes-index", "--root", "{tmp}/no-root", "--out", "{tmp}/c.jsonl", expect="argument --root"),
    M("cityscapes-index", "--root", "{empty}", "--out", "{tmp}/c.jsonl", expect="no gtFine/val"),
    M(
        "cityscapes-index",
        "--root",
        "{empty}",
        "--min-pixels",
        "0",
        "--out",
        "{tmp}/c.jsonl",
        expect="argument --min-pixels",
    ),
    M("bench", "--bundle", "{tmp}/no-bundle", expect="argument --bundle: no such directory"),
    M("bench", "--runs", "0", expect="argument --runs: expected a whole number > 0"),
    M("bench", "--bundle", R, expect="needs the train extra", block=_TRAIN_BLOCKED),
    M("bench", "--teacher", "NoSuchModel", expect="--teacher: unknown open_clip model 'NoSuchModel'", marks=TRAIN),
    M("world", expect="the following arguments are required: ACTION", marks=WORLD),
    M("world", "images", "--count", "0", "--out", "{tmp}/w", expect="--count must be between 1", marks=WORLD),
    M("world", "clip", "--out", "{tmp}/drive.avi", expect="--out must name an .mp4 file", marks=WORLD),
    M("chain", "--work", "{tmp}/w", "--out", "{tmp}/b", expect="the following arguments are required: --config"),
    M("chain", "--config", "{tmp}/no.toml", "--work", "{tmp}/w", "--out", "{tmp}/b", expect="config file not found"),
    M("chain", "--config", "{bad_chain}", "--work", "{tmp}/w", "--out", "{tmp}/b", expect="teacher: Field required"),
    M(
        "chain",
        "--config",
        "{chain_ci}",
        "--work",
        "{tmp}/w",
        "--out",
        "{tmp}/b",
        "--until",
        "nope",
        expect="--until: invalid choice",
    ),
    M(
        "chain",
        "--config",
        "{chain_ci}",
        "--work",
        "{tmp}/w",
        "--out",
        "{tmp}/b",
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M(
        "chain",
        "--config",
        "{qat_minmax_chain}",
        "--work",
        "{tmp}/w",
        "--out",
        "{tmp}/b",
        expect='set quantize.method = "minmax-mean"',
    ),
    M(
        "qat",
        "--checkpoint",
        "{tmp}/no.pt",
        "--images",
        "{empty}",
        "--held-out",
        "{empty}",
        "--out",
        "{tmp}/q",
        expect="argument --checkpoint: no such file",
    ),
    M(
        *QAT_GARBAGE,
        "--steps",
        "0",
        expect="argument --steps",
    ),
    M(
        *QAT_GARBAGE,
        expect="is it a student.pt from a distill run?",
        marks=TRAIN,
        log_lines=1,  # "loading the student": the error comes from reading the file it names,
    ),
    M(
        *QAT_GARBAGE,
        expect="needs the train extra",
        block=_TRAIN_BLOCKED,
    ),
    M("teacher-train", "--config", "{tmp}/no.toml", expect="config file not found"),
    M("teacher-train", "--set", "model.name=nope", "--out", "{tmp}/t", expect="model.name: no open_clip config 'nope'"),
    M("teacher-train", "--steps", "0", "--out", "{tmp}/t", expect="optim.steps: Input should be greater than"),
    M("teacher-train", "--set", "optim.lr=abc", "--out", "{tmp}/t", expect="optim.lr: Input should be a valid number"),
    M("teacher-train", "--eval-only", "--out", "{tmp}/t", expect="--eval-only: no checkpoint at"),
    M("teacher-train", "--checkpoint", "{tmp}/c.pt", "--out", "{tmp}/t", expect="--checkpoint goes with --eval-only"),
    M("teacher-train", "--out", "{tmp}/t", "--steps", "500", expect="needs the train extra", block=_TRAIN_BLOCKED),
]


def _case_id(c: Case) -> str:
    words = " ".join(a.strip("{}").rsplit("/", 1)[-1] for a in c.args)
    return f"{c.prog} {words}{' [no train extra]' if c.block else ''}"[:100]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    """The broken files the cases point at, made once."""
    from retrofit_agent.contract.sample import write_clip
    from retrofit_agent.contract.signing import generate_signing_keys
    from retrofit_agent.daemon.curve import generate_curve_keys

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "garbage.bin").write_bytes(b"\x00\xff\xfe not a model, key or text \x80\x81")
    (tmp / "bad.toml").write_text("camera = = 1\n")
    (tmp / "no_templates.toml").write_text('[[groups]]\nname = "g"\n')
    (tmp / "bad_chain.toml").write_text('[distill]\nconfig = "models/configs/ci-student.toml"\n')
    (tmp / "qat_minmax_chain.toml").write_text(
        '[teacher]\nconfig = "models/configs/ci-teacher.toml"\n[distill]\nconfig = "models/configs/ci-student.toml"\n'
        '[qat]\nsteps = 5\n[quantize]\nmethod = "minmax"\n'
    )
    (tmp / "campaign.toml").write_text(
        '[[collect.campaigns]]\nname = "hail"\nrule = { any_of = ["weather.hail"] }\n'
        f'[collect.store]\ndirectory = "{tmp}/captures"\n'
    )
    tampered = tmp / "tampered"
    shutil.copytree(SEEDED, tampered)
    with open(tampered / "bank.npz", "ab") as f:
        f.write(b"\0")
    keys = tmp / "keys-taken"
    generate_curve_keys(keys, "taken")
    generate_signing_keys(keys, "taken")
    clip = write_clip(tmp / "clip.mp4", n_frames=5, fps=15.0)
    busy = __import__("socket").socket()
    busy.bind(("127.0.0.1", free_port()))
    busy.listen(1)
    values = {
        "tmp": str(tmp),
        "empty": str(tmp / "empty"),
        "garbage": str(tmp / "garbage.bin"),
        "bad_toml": str(tmp / "bad.toml"),
        "no_templates": str(tmp / "no_templates.toml"),
        "bad_chain": str(tmp / "bad_chain.toml"),
        "qat_minmax_chain": str(tmp / "qat_minmax_chain.toml"),
        "chain_ci": str(REPO / "models/configs/chain-ci.toml"),
        "campaign_toml": str(tmp / "campaign.toml"),
        "tampered": str(tampered),
        "existing_keys": str(keys),
        "clip": str(clip),
        "busy_port": str(busy.getsockname()[1]),
    }
    yield values
    busy.close()


ERROR_LINE = re.compile(r"^(retrofit-agent|retrofit-model)( [a-z-]+)?: error: \S")


def run_case(case: Case, inputs: dict[str, str]) -> subprocess.CompletedProcess:
    args = [a.format(**inputs) for a in case.args]
    if case.prog == "agent":
        cmd = agent_command(*args)
    else:
        cmd = model_command(*args, block=case.block)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETROFIT_")}
    env.update({k: v.format(**inputs) for k, v in case.env})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c), marks=c.marks) for c in CASES])
def test_bad_input_gives_one_error_line_and_no_traceback(case: Case, inputs):
    r = run_case(case, inputs)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines, f"no error line; stdout: {r.stdout!r}"
    assert r.returncode == case.code, r.stderr
    assert ERROR_LINE.match(lines[-1]), lines[-1]
    prog = "retrofit-agent" if case.prog == "agent" else "retrofit-model"
    assert lines[-1].startswith(prog), lines[-1]
    assert case.expect.format(**inputs) in lines[-1]
    before = lines[:-1]
    assert len(before) <= case.log_lines, f"{len(before)} lines before the error: {before}"
    for line in before:  # a daemon log line (JSON, as stderr is not a terminal) or a library's one-line warning
        assert line.startswith(("{", "WARNING:", "ERROR:")), line
        if line.startswith("{"):
            assert "event" in json.loads(line)


def test_every_subcommand_has_cases():
    assert _agent_subcommands() - {c.command for c in CASES if c.prog == "agent"} == set()
    assert _model_subcommands() - {c.command for c in CASES if c.prog == "model"} == set()


def test_every_command_that_needs_the_train_extra_says_how_to_install_it():
    """Every retrofit-model command except those that need only the runtime has a case run
    without torch, timm, open_clip and onnx, answered with the install commands."""
    runtime_only = {"synth-images", "cityscapes-index", "world"}
    covered = {c.command for c in CASES if c.prog == "model" and c.block}
    assert _model_subcommands() - runtime_only - covered == set()
    case = next(c for c in CASES if c.block)
    assert case.expect == "needs the train extra"


def test_missing_train_extra_line_names_the_install_commands(inputs):
    r = run_case(M("prompts", "--prompts", P, "--out", "{tmp}/b.npz", expect="", block=_TRAIN_BLOCKED), inputs)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "pip install 'retrofit-agent[train]'" in line
    assert "torch==2.14.1 torchvision==0.29.1" in line
