"""The whole chain at CI size, and proof that its score notices a wrong pipeline.

world → a tiny CLIP teacher trained from scratch → a tiny student distilled from it → ONNX →
int8 → bank → bundle → the real daemon on a world drive clip, its tags over ZeroMQ scored per
group against the clip's ground truth (models/configs/chain-ci.toml; a few minutes on 2 cores).

The tiny teacher learns the picture-wide groups in its minute of training: time of day (chance
1/3) and weather (chance 1/5). Those two are the bar here; the reference build holds every group
to 90%. Each fault below is one a random network could never reveal (it maps every picture to
about the same direction): each must push the score under the bar, or be refused outright.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.integration]

PROFILE = REPO / "models/configs/chain-ci.toml"
BAR = {"time_of_day": 0.9, "weather": 0.4}


def _main(*argv: str) -> int:
    from retrofit_agent.train.cli import main

    return main(["--log-format", "json", *argv])


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("chain-ci")
    assert _main("chain", "--config", str(PROFILE), "--work", str(work), "--out", str(work / "bundle")) == 0
    return {"work": work, "bundle": work / "bundle", "results": json.loads((work / "chain.json").read_text())}


def clip_scores(chain: dict, bundle: Path, name: str) -> dict[str, float]:
    from retrofit_agent.train.chain import run_daemon_on_clip
    from retrofit_agent.train.world.score import read_truth, score_tags

    clip = Path(chain["results"]["clip"]["clip"])
    work = chain["work"] / f"fault-{name}"
    work.mkdir()
    scores = score_tags(run_daemon_on_clip(bundle, clip, work), read_truth(clip.with_suffix(".jsonl")), 1.0)
    return {g: s.accuracy for g, s in scores.items()}


def meets_bar(top1: dict[str, float]) -> bool:
    return all(top1.get(g, 0.0) >= bar for g, bar in BAR.items())


def test_the_daemon_labels_the_drive_well_above_chance_with_a_bundle_the_chain_trained(chain: dict):
    r = chain["results"]
    top1 = r["score"]["top1"]
    print(f"\n[chain figure] daemon top-1 on the clip: {top1}")
    print(f"[chain figure] teacher held-out top-1: {r['teacher']['eval']}")
    print(f"[chain figure] stage wall seconds: { {k: v['wall_s'] for k, v in r.items()} }")
    assert meets_bar(top1), top1
    assert r["score"]["frames"] > 100
    manifest = json.loads((chain["bundle"] / "manifest.json").read_text())
    assert manifest["trained"] is True and "synthetic" in manifest["notice"]
    # The int8 model came through the quantization-aware stage and the gate, and says so.
    assert r["qat"]["steps"] == 20 and r["qat"]["metrics"]["kind"] == "eval"
    print(f"[chain figure] qat: last simulated int8 agreement {r['qat']['metrics']}")
    assert "quantization-aware" in manifest["model"]["quantization"]["calibration"]


def test_a_second_run_takes_every_stage_from_its_cache(chain: dict, capfd: pytest.CaptureFixture[str]):
    bundle_bytes = (chain["bundle"] / "student.int8.onnx").read_bytes()
    work = chain["work"]
    assert (
        _main(
            "chain", "--config", str(PROFILE), "--work", str(work), "--out", str(chain["bundle"]), "--until", "bundle"
        )
        == 0
    )
    err = capfd.readouterr().err
    assert err.count('"chain_stage_cached"') == 9 and '"chain_stage_started"' not in err
    assert (chain["bundle"] / "student.int8.onnx").read_bytes() == bundle_bytes


def _variant(chain: dict, name: str) -> Path:
    d = chain["work"] / f"bundle-{name}"
    shutil.copytree(chain["bundle"], d)
    return d


def _edit_input(bundle: Path, **spec: object) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["model"]["input"].update(spec)
    path.write_text(json.dumps(m, indent=2))


def test_swapping_rgb_and_bgr_falls_below_the_bar(chain: dict):
    bundle = _variant(chain, "bgr")
    _edit_input(bundle, color="BGR")
    top1 = clip_scores(chain, bundle, "bgr")
    print(f"\n[chain figure] BGR instead of RGB: {top1}")
    assert not meets_bar(top1), top1


def test_dropping_normalisation_falls_below_the_bar(chain: dict):
    bundle = _variant(chain, "no-norm")
    _edit_input(bundle, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    top1 = clip_scores(chain, bundle, "no-norm")
    print(f"\n[chain figure] no normalisation: {top1}")
    assert not meets_bar(top1), top1


def test_a_bank_from_other_templates_falls_below_the_bar(chain: dict):
    """The same teacher, but each time-of-day and weather label given another label's phrases."""
    text = (REPO / "models/prompts/automotive.toml").read_text()
    swaps = [
        ('"daytime", "daylight"', '"night", "darkness with street lights"'),
        ('"clear weather", "a sunny day", "a clear sky"', '"fog", "a foggy road", "low visibility in mist"'),
    ]
    for a, b in swaps:
        assert a in text and b in text
        text = text.replace(a, "\0").replace(b, a).replace("\0", b)
    prompts = chain["work"] / "swapped.toml"
    prompts.write_text(text)
    teacher = chain["results"]["teacher"]
    bank = chain["work"] / "swapped-bank.npz"
    assert (
        _main(
            "prompts",
            "--prompts",
            str(prompts),
            "--teacher",
            teacher["model"],
            "--pretrained",
            teacher["checkpoint"],
            "--out",
            str(bank),
        )
        == 0
    )
    bundle = chain["work"] / "bundle-swapped"
    assert (
        _main(
            "bundle",
            *("--model", str(chain["bundle"] / "student.int8.onnx"), "--bank", str(bank), "--prompts", str(prompts)),
            *("--name", "swapped", "--version", "0", "--quantization", "int8_static_qdq", "--out", str(bundle)),
        )
        == 0
    )
    top1 = clip_scores(chain, bundle, "swapped")
    print(f"\n[chain figure] templates swapped between labels: {top1}")
    assert not meets_bar(top1), top1


def test_a_bank_from_another_teacher_is_refused_at_start_up(chain: dict):
    bundle = _variant(chain, "other-teacher")
    bank = bundle / "bank.npz"
    teacher = chain["results"]["teacher"]["model"]
    assert (
        _main(
            "prompts",
            "--prompts",
            str(REPO / "models/prompts/automotive.toml"),
            "--teacher",
            teacher,
            "--pretrained",
            "none",
            "--seed",
            "0",
            "--out",
            str(bank),
        )
        == 0
    )
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["files"]["bank.npz"] = hashlib.sha256(bank.read_bytes()).hexdigest()
    path.write_text(json.dumps(m, indent=2))
    from retrofit_agent.contract.errors import RetrofitError

    with pytest.raises(RetrofitError, match="text bank was built with teacher"):
        clip_scores(chain, bundle, "other-teacher")


def test_evaluate_reports_per_group_fidelity_and_regions_on_the_world(chain: dict, capsys: pytest.CaptureFixture[str]):
    """``evaluate --world --regions`` on the chain's held-out pictures: the teacher column agrees
    with the teacher stage's own evaluation on the groups it learnt, the int8 student meets the
    bar there too, and every localized label's region counts add up to what the boxes say."""
    from retrofit_agent.train.evaluate import read_world
    from retrofit_agent.train.regions_eval import true_boxes

    teacher = chain["results"]["teacher"]
    heldout = chain["work"] / "world" / "heldout"
    out = chain["work"] / "evaluate"
    argv = ["evaluate", "--bundle", str(chain["bundle"]), "--teacher", teacher["model"]]
    argv += ["--pretrained", teacher["checkpoint"], "--fp32", chain["results"]["export"]["fp32"]]
    argv += ["--world", str(heldout), "--regions", str(heldout), "--goal", "0.9", "--out", str(out)]
    assert _main(*argv) == 0
    print(capsys.readouterr().out)
    world = json.loads((out / "world.json").read_text())["models"]
    assert list(world) == ["teacher", "student_fp32", "student_int8"]
    for group, bar in BAR.items():
        assert world["teacher"][group] >= bar and world["student_int8"][group] >= bar, (group, world)
    assert world["student_int8"]["agreement/time_of_day"] >= 0.8
    regions = json.loads((out / "regions.json").read_text())
    records, _ = read_world(heldout)
    manifest = json.loads((chain["bundle"] / "manifest.json").read_text())
    localized = [
        f"{g['name']}.{lab['name']}" for g in manifest["bank"]["groups"] for lab in g["labels"] if lab["localize"]
    ]
    assert localized and set(regions["models"]) == {"teacher", "student_fp32", "student_int8"}
    for key in localized:
        with_it = sum(bool(true_boxes(r, key)) for r in records)
        for scores in regions["models"].values():
            s = scores[key]
            assert s["images_with"] == with_it and 0 <= s["pointing_hits"] <= with_it
            assert s["boxes"] == sum(len(true_boxes(r, key)) for r in records)
    assert (out / "regions.png").stat().st_size > 0 and (out / "world.png").stat().st_size > 0


def test_a_bundle_of_the_float_model_says_so_and_names_its_file_for_it(chain: dict):
    """``[quantize] mode = "none"`` (for a student whose int8 the gate refuses) bundles the fp32
    export: the file is named for what it holds, the manifest says it is not quantized, and the
    daemon labels the drive with it as it does with int8."""
    from retrofit_agent.contract.bundle import Quantization, load_bundle
    from retrofit_agent.contract.prompts import load_prompts
    from retrofit_agent.train.assemble import FLOAT_MODEL_FILE, assemble_bundle

    out = chain["work"] / "bundle-fp32"
    assemble_bundle(
        out,
        Path(chain["results"]["export"]["fp32"]),
        Path(chain["results"]["bank"]["bank"]),
        load_prompts(REPO / "models/prompts/automotive.toml"),
        name="chain-fp32",
        version="1",
        trained=None,
        quantization=Quantization(mode="none"),
    )
    m = load_bundle(out).manifest
    assert m.model.file == FLOAT_MODEL_FILE and m.model.quantization.mode == "none" and m.trained is True
    assert not (out / "student.int8.onnx").exists()
    top1 = clip_scores(chain, out, "fp32")
    print(f"\n[chain figure] the fp32 model bundled: {top1}")
    assert meets_bar(top1), top1
