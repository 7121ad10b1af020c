from pathlib import Path

import pytest

from helpers import REPO
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.config import AgentConfig, load_config


def test_defaults_bind_loopback_only():
    cfg = AgentConfig()
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5556"
    assert cfg.metrics.address == "127.0.0.1:9108"
    assert cfg.camera.source == "/dev/video0"


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} lacks a description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(AgentConfig)


def test_annotated_example_loads():
    cfg = load_config(REPO / "deploy" / "agent.toml", environ={})
    assert cfg.camera.id == "front"
    assert cfg.camera.fourcc == "MJPG"
    assert cfg.labels.thresholds["weather.rain"] == 0.6
    assert cfg.publish.endpoint.startswith("ipc://")


def test_flags_win_over_env_over_file(tmp_path: Path):
    f = tmp_path / "a.toml"
    f.write_text('[camera]\nsource = "file.mp4"\nstall_timeout_s = 2\n[model]\nintra_op_threads = 1\n')
    env = {"RETROFIT_CAMERA__SOURCE": "env.mp4", "RETROFIT_MODEL__INTRA_OP_THREADS": "3"}
    cfg = load_config(f, env, {"camera.source": "flag.mp4", "max_frames": None})
    assert cfg.camera.source == "flag.mp4"
    assert cfg.model.intra_op_threads == 3
    assert cfg.camera.stall_timeout_s == 2
    assert cfg.max_frames is None


def test_config_file_from_environment(tmp_path: Path):
    f = tmp_path / "a.toml"
    f.write_text("max_frames = 7\n")
    assert load_config(None, {"RETROFIT_CONFIG": str(f)}).max_frames == 7


def test_env_json_values():
    cfg = load_config(None, {"RETROFIT_LABELS__THRESHOLDS": '{"weather.rain": 0.7}'})
    assert cfg.labels.thresholds == {"weather.rain": 0.7}


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[camera]\nsorce = 'x'\n", "camera.sorce: unknown setting"),
        ("[camera]\nfps = 'fast'\n", "camera.fps"),
        ("[camera]\nfps = -1\n", "camera.fps: Input should be greater than 0"),
        ("[labels]\nsmoothing_alpha = 2\n", "labels.smoothing_alpha"),
        ("[metrics]\naddress = 'nowhere'\n", "metrics.address"),
        ("[publish]\nendpoint = 'udp://x'\n", "publish.endpoint"),
        ("[camera]\nfourcc = 'MJPEG'\n", "camera.fourcc"),
        ("[labels.thresholds]\nrain = 0.5\n", "labels.thresholds"),
        ("[[camera]]\n", "camera"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, toml: str, expected: str):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f, {})
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_malformed_toml(tmp_path: Path):
    f = tmp_path / "bad.toml"
    f.write_text("[camera\nsource = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, {})


def test_unknown_environment_variable_is_refused():
    with pytest.raises(ConfigError, match="camera.colour: unknown setting"):
        load_config(None, {"RETROFIT_CAMERA__COLOUR": "red"})


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", {})


def test_example_campaigns_use_tags_the_reference_bundle_knows(seeded_bundle):
    from retrofit_agent.contract.bundle import load_bundle
    from retrofit_agent.daemon.collect.collector import check_campaign_tags

    cfg = load_config(REPO / "deploy" / "agent.toml", environ={})
    assert cfg.collect.campaigns
    check_campaign_tags(cfg.collect, set(load_bundle(seeded_bundle).bank.keys))
