"""A procedural driving world: seeded scenes rendered with OpenCV, with exact ground truth.

No pretrained weights can be downloaded, so the toolchain trains its CLIP teacher from
scratch on this world and distils the student from it. Torch-free on purpose (numpy,
OpenCV, pydantic and the standard library), so the runtime's tests can render labelled
pictures and clips too.

    space = load_label_space()                       # groups/labels from automotive.toml
    scene = sample_scene(seed, 160, 160, space)      # one label per group + placed instances
    image = render(scene)                            # BGR uint8, 160x160
    truth = annotate(scene, space)                   # labels (null = unobservable) + boxes
    text = caption(scene, truth.labels, truth.boxes, space)

Command line: ``retrofit-model world images ...`` and ``retrofit-model world clip ...``.
"""

from retrofit_agent.train.world.annotate import Annotation, annotate
from retrofit_agent.train.world.captions import caption
from retrofit_agent.train.world.dataset import ImageSetSummary, scene_seed, write_image_set
from retrofit_agent.train.world.drive import (
    DEFAULT_PLAN,
    DriveFrame,
    Segment,
    frames,
    parse_plan,
    parse_segment,
    write_clip,
)
from retrofit_agent.train.world.labels import DEFAULT_PROMPTS, LabelSpace, WorldError, load_label_space
from retrofit_agent.train.world.records import BoxRecord, FrameRecord, ImageRecord
from retrofit_agent.train.world.render import encode_jpeg, render
from retrofit_agent.train.world.sample import sample_conditions, sample_scene
from retrofit_agent.train.world.scene import SCENE_ADAPTER, Scene, Thing

__all__ = [
    "Annotation",
    "BoxRecord",
    "DEFAULT_PLAN",
    "DEFAULT_PROMPTS",
    "DriveFrame",
    "FrameRecord",
    "ImageRecord",
    "ImageSetSummary",
    "LabelSpace",
    "SCENE_ADAPTER",
    "Scene",
    "Segment",
    "Thing",
    "WorldError",
    "annotate",
    "caption",
    "encode_jpeg",
    "frames",
    "load_label_space",
    "parse_plan",
    "parse_segment",
    "render",
    "sample_conditions",
    "sample_scene",
    "scene_seed",
    "write_clip",
    "write_image_set",
]
