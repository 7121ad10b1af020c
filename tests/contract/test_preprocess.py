import numpy as np
import pytest

from retrofit_agent.contract.bundle import InputSpec
from retrofit_agent.contract.preprocess import BadFrameError, Preprocessor, to_bgr8


def spec(**kw) -> InputSpec:
    base = dict(name="image", height=4, width=6, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    base.update(kw)
    return InputSpec(**base)


def test_known_values_rgb_nchw():
    frame = np.zeros((4, 6, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    frame[..., 2] = 51  # red
    x = Preprocessor(spec())(frame)
    assert x.shape == (1, 3, 4, 6) and x.dtype == np.float32
    # RGB order: R = 51/255 = 0.2 → (0.2-0.5)/0.5 = -0.6 ; G = 0 → (0-0.25)/0.25 = -1 ; B = 1 → (1-0)/1 = 1
    np.testing.assert_allclose(x[0, :, 0, 0], [-0.6, -1.0, 1.0], atol=1e-6)


def test_bgr_nhwc_layout_comes_from_the_manifest():
    frame = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    x = Preprocessor(spec(color="BGR", layout="NHWC", height=8, width=8))(frame)
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(x[0, 3, 3, 2], (frame[3, 3, 2] / 255.0 - 0.0) / 1.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["stretch", "center_crop", "letterbox"])
def test_resize_modes_give_model_size(mode):
    frame = np.full((360, 640, 3), 128, np.uint8)
    pre = Preprocessor(spec(height=300, width=300, resize=mode))
    assert pre.resize(frame).shape == (300, 300, 3)
    assert pre(frame).shape == (1, 3, 300, 300)


def test_letterbox_pads_with_the_mean_colour():
    frame = np.full((100, 400, 3), 255, np.uint8)
    pre = Preprocessor(spec(height=300, width=300, resize="letterbox"))
    x = pre(frame)
    np.testing.assert_allclose(x[0, :, 0, 0], 0.0, atol=0.01)  # padding normalises to ~0
    assert x[0, 0, 150, 150] > 0.9


def test_batch_matches_single_frames():
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    pre = Preprocessor(spec())
    np.testing.assert_array_equal(pre.batch(frames)[1], pre(frames[1])[0])


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 1), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.uint16),
        np.zeros((4320, 7680, 3), np.uint8),
    ],
    ids=["gray", "gray1", "bgra", "16bit", "8k"],
)
def test_convertible_frames(frame):
    out = to_bgr8(frame)
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
    assert Preprocessor(spec(height=300, width=300))(out).shape == (1, 3, 300, 300)


@pytest.mark.parametrize(
    "frame", [None, np.zeros((0, 0, 3), np.uint8), np.zeros((10, 10, 2), np.uint8), np.zeros((10, 10, 3), np.int32)]
)
def test_unusable_frames_are_rejected(frame):
    with pytest.raises(BadFrameError):
        to_bgr8(frame)


def test_16bit_keeps_the_high_byte():
    frame = np.full((2, 2, 3), 0xAB00, np.uint16)
    assert to_bgr8(frame)[0, 0, 0] == 0xAB
