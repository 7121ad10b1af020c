"""Captions for CLIP training, written from a picture's ground truth.

Each observable label is mentioned with probability ~0.6-0.8, in random order and with a
random wording drawn from the prompts file's own phrases plus synonyms, so the text tower
learns the vocabulary the bank will be built from (rain, night, highway, stop sign, ...)
without ever seeing the bank's templates: a caption never contains the text around ``{}``
of any template (no "a dashcam photo of", and no full stop), otherwise a teacher could
learn the template as the signal instead of the content. Absence ("no pedestrians",
"without cyclists") is said sometimes, as people do. Groups whose truth is ``null`` are
never mentioned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import numpy as np

from retrofit_agent.train.world.labels import EMPTY, LabelSpace
from retrofit_agent.train.world.records import BoxRecord
from retrofit_agent.train.world.scene import Scene

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}

# Extra wordings per (group, label); the prompts file's phrases are added to these. Keys
# ending in "+" are for several instances; "{n}" is a number word, "{speed}" the limit.
SYNONYMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("weather", "clear"): ("clear weather", "a clear sky", "fine weather"),
    ("weather", "cloudy"): ("an overcast sky", "grey clouds", "a cloudy sky", "overcast weather"),
    ("weather", "rain"): ("heavy rain", "rainy weather", "in the rain", "a rainy road"),
    ("weather", "snow"): ("falling snow", "in the snow", "a snow-covered roadside", "snowy weather"),
    ("weather", "fog"): ("thick fog", "mist", "in dense fog", "foggy weather"),
    ("time_of_day", "day"): ("during the day", "in broad daylight", "by day"),
    ("time_of_day", "dusk"): ("at dusk", "evening twilight", "at sunset"),
    ("time_of_day", "night"): ("at night", "nighttime", "in the dark", "night time"),
    ("road_type", "highway"): ("a multi-lane highway", "the motorway", "a freeway", "a highway with crash barriers"),
    ("road_type", "urban"): (
        "a street in town",
        "a city road between buildings",
        "a downtown street",
        "city traffic lanes",
    ),
    ("road_type", "rural"): ("a narrow country lane", "a rural road", "a country road between fields"),
    ("road_type", "parking"): ("a car park", "a parking area with marked bays", "parking spaces"),
    ("scene", "tunnel"): (
        "driving through a tunnel",
        "a road tunnel with lamps",
        "a tunnel with lights on the ceiling",
    ),
    ("scene", "construction_zone"): (
        "roadworks",
        "traffic cones and barriers",
        "a work zone with orange cones",
        "road construction",
    ),
    ("scene", "bridge"): ("crossing a bridge", "a bridge over water", "a bridge with railings"),
    ("scene", "open_road"): ("an open road", "an ordinary road"),
    ("pedestrians", "present"): ("a pedestrian", "a person walking", "a person on foot"),
    ("pedestrians", "present+"): (
        "pedestrians",
        "people walking on the street",
        "{n} pedestrians",
        "several people",
        "a group of people",
    ),
    ("pedestrians", "absent"): ("no pedestrians", "without people", "nobody on foot", "no people"),
    ("cyclists", "present"): ("a cyclist", "a person riding a bicycle", "a bicycle on the road", "a bike rider"),
    ("cyclists", "present+"): ("cyclists", "{n} cyclists", "people on bicycles", "bicycles on the road"),
    ("cyclists", "absent"): ("no cyclists", "without cyclists", "no bicycles"),
    ("traffic_light", "red"): ("a traffic light showing red", "a red light", "a red signal"),
    ("traffic_light", "yellow"): ("an amber light", "a traffic light on yellow", "a yellow signal"),
    ("traffic_light", "green"): ("a traffic light showing green", "a green light", "a green signal"),
    ("traffic_light", "none"): ("no traffic lights", "no signals"),
    ("signs", "stop"): ("a red stop sign", "an octagonal stop sign"),
    ("signs", "speed_limit"): ("a {speed} speed limit sign", "a speed limit of {speed}", "a round speed limit sign"),
    ("signs", "yield"): ("a triangular yield sign", "a yield sign at the roadside"),
    ("signs", "none"): ("no traffic signs", "no signs"),
    ("vehicles", "car"): ("a passenger car", "a car ahead"),
    ("vehicles", "car+"): ("cars in traffic", "several cars", "{n} cars"),
    ("vehicles", "truck"): ("a heavy truck", "a truck ahead"),
    ("vehicles", "truck+"): ("trucks", "{n} trucks", "lorries"),
    ("vehicles", "bus"): ("a city bus", "a coach"),
    ("vehicles", "bus+"): ("buses", "{n} buses"),
    ("vehicles", "motorcycle"): ("a motorcyclist", "a motorbike rider"),
    ("vehicles", "motorcycle+"): ("motorcycles", "{n} motorbikes"),
    ("vehicles", "none"): ("no other vehicles", "no traffic", "no cars"),
}
# Wordings that only hold at some times of day.
_DAY_ONLY = frozenset({"a sunny day", "fine weather", "at sunset"})
_OPENERS = ("", "", "", "view ahead: ", "through the windshield: ", "front camera: ", "driving: ", "on the road: ")
_JOINERS = (", ", ", ", "; ", " and ")


def phrases(space: LabelSpace, group: str, label: str, many: bool) -> list[str]:
    """Every wording for one label: synonyms first, then the prompts file's phrases.

    The file's plural phrases ("cars in traffic") are kept for one instance too: a caption
    may be loose, a wrong count would not be (the "+" lists never describe one thing)."""
    key = (group, label + "+") if many and (group, label + "+") in SYNONYMS else (group, label)
    out = list(SYNONYMS.get(key, ()))
    if not many or key[1] == label:
        out += [p for p in space.phrases.get((group, label), ()) if p not in out]
    return out


def caption(
    scene: Scene,
    labels: dict[str, str | None],
    boxes: list[BoxRecord] | tuple[BoxRecord, ...],
    space: LabelSpace,
    mention: Collection[str] = (),
) -> str:
    """One caption for a picture with these ground-truth ``labels`` and ``boxes``.

    Groups in ``mention`` are always named when their truth is known (the group a minimal
    pair differs in); the random draws are the same either way, so two pictures of one
    scene get the same wording for everything else."""
    rng = np.random.default_rng([scene.seed, 3])
    counts = Counter(b.group for b in boxes if b.legible)
    speed = next((t.number for t in scene.things if t.kind == "sign" and t.label == "speed_limit"), 50)
    p_mention = rng.uniform(0.6, 0.8)
    p_absent = rng.uniform(0.15, 0.4)
    parts: list[str] = []
    groups = list(labels)
    rng.shuffle(groups)
    for group in groups:
        label = labels[group]
        if label is None:
            continue
        empty = label == EMPTY.get(group) or (group == "scene" and label == "open_road")
        if rng.random() >= (p_absent if empty else p_mention) and group not in mention:
            continue
        many = counts.get(group, 0) > 1
        options = phrases(space, group, label, many)
        if scene.conditions.time_of_day != "day" or labels.get("time_of_day") is None:
            options = [o for o in options if o not in _DAY_ONLY] or options
        text = options[int(rng.integers(0, len(options)))]
        parts.append(text.format(n=_NUMBERS.get(counts.get(group, 2), "several"), speed=speed))
    if not parts:  # never an empty caption: the road is always there to talk about
        parts.append(phrases(space, "road_type", labels.get("road_type") or scene.conditions.road_type, False)[0])
    text = _join(rng, parts)
    text = _OPENERS[int(rng.integers(0, len(_OPENERS)))] + text
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def _join(rng: np.random.Generator, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    style = int(rng.integers(0, 3))
    if style == 0:
        return ", ".join(parts)
    if style == 1:  # "a city street with a bus, a red light and pedestrians"
        rest = parts[1:]
        tail = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
        return f"{parts[0]} with {tail}"
    return "".join(
        p + (_JOINERS[int(rng.integers(0, len(_JOINERS)))] if i < len(parts) - 1 else "") for i, p in enumerate(parts)
    )
