"""The world's label space, read from the prompts file the bank is built from.

The renderer can only draw what it has code for (:data:`RENDERABLE`); the prompts file says
which of those labels exist. Reading the file instead of keeping a second list means a label
dropped from ``automotive.toml`` stops being sampled, and a label added there that the world
cannot draw is refused with a message, rather than silently never appearing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Source checkout layout: retrofit_agent/train/world/labels.py -> repo root is parents[3].
DEFAULT_PROMPTS = Path(__file__).resolve().parents[3] / "models" / "prompts" / "automotive.toml"

# Everything the renderer knows how to show, group by group. The groups split in two kinds:
# conditions of the whole picture, and groups decided by which object instances are visible.
RENDERABLE: dict[str, tuple[str, ...]] = {
    "weather": ("clear", "cloudy", "rain", "snow", "fog"),
    "time_of_day": ("day", "dusk", "night"),
    "road_type": ("highway", "urban", "rural", "parking"),
    "scene": ("tunnel", "construction_zone", "bridge", "open_road"),
    "pedestrians": ("present", "absent"),
    "cyclists": ("present", "absent"),
    "traffic_light": ("red", "yellow", "green", "none"),
    "signs": ("stop", "speed_limit", "yield", "none"),
    "vehicles": ("car", "truck", "bus", "motorcycle", "none"),
}
CONDITION_GROUPS = ("weather", "time_of_day", "road_type", "scene")
OBJECT_GROUPS = ("pedestrians", "cyclists", "traffic_light", "signs", "vehicles")
# The label an object group takes when none of its instances is in view.
EMPTY = {"pedestrians": "absent", "cyclists": "absent", "traffic_light": "none", "signs": "none", "vehicles": "none"}


class WorldError(ValueError):
    """Bad input to the world (a parameter, a segment name, a prompts file): one line."""


class LabelSpaceError(WorldError):
    """The prompts file cannot be read, or names a label the world cannot draw."""


@dataclass(frozen=True)
class LabelSpace:
    """Groups and labels (in file order), each label's phrases, and the prompt templates."""

    groups: dict[str, tuple[str, ...]]
    phrases: dict[tuple[str, str], tuple[str, ...]]
    templates: tuple[str, ...]

    def template_fixed_texts(self) -> list[str]:
        """The literal text around ``{}`` in every template, e.g. ``"a dashcam photo of "``.

        Captions must contain none of these, so the teacher cannot learn the templates
        themselves as the signal (see :mod:`.captions`).
        """
        parts = [part for t in self.templates for part in t.split("{}")]
        return [p for p in parts if p.strip()]


def load_label_space(path: Path = DEFAULT_PROMPTS) -> LabelSpace:
    """Read ``path`` (the prompts TOML) and check the world can render every label in it."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise LabelSpaceError(f"prompts file {str(path)!r} cannot be read: {e}") from None
    groups: dict[str, tuple[str, ...]] = {}
    phrases: dict[tuple[str, str], tuple[str, ...]] = {}
    for group in doc.get("groups", []):
        name = str(group.get("name"))
        if name not in RENDERABLE:
            raise LabelSpaceError(
                f"prompts file {str(path)!r}: the world cannot render group {name!r} (it draws {sorted(RENDERABLE)})"
            )
        labels = tuple(str(label["name"]) for label in group.get("labels", []))
        unknown = [label for label in labels if label not in RENDERABLE[name]]
        if unknown:
            raise LabelSpaceError(
                f"prompts file {str(path)!r}: the world cannot render {name}.{unknown[0]} (it draws {list(RENDERABLE[name])})"
            )
        # The empty label of an object group is always available: it is what "nothing in view" means.
        if name in EMPTY and EMPTY[name] not in labels:
            labels = labels + (EMPTY[name],)
        if name == "scene" and "open_road" not in labels:
            labels = labels + ("open_road",)
        groups[name] = labels
        for label in group.get("labels", []):
            phrases[(name, str(label["name"]))] = tuple(str(p) for p in label.get("phrases", []))
    # Groups the file does not name still get a condition (a road has some weather), but
    # only the file's groups are reported and captioned.
    if not groups:
        raise LabelSpaceError(f"prompts file {str(path)!r} has no [[groups]]")
    return LabelSpace(groups=groups, phrases=phrases, templates=tuple(str(t) for t in doc.get("templates", [])))
