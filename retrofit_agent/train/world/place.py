"""Where object instances go: zones by road type, sizes by image fraction, legibility retries.

Each sampled label gets a first instance that must be legible (in frame, at least
:data:`KEY_MIN_HEIGHT` of the image tall, not hidden, clear of fog); extra instances of the
same label are added when they fit and dropped when they do not. Instance sizes of signs
and traffic lights are exaggerated (up to ~1.6x life size) so a 128-pixel picture still
shows their shape and lamp; people and vehicles keep life size and come closer instead.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from retrofit_agent.train.world.annotate import fog_factor
from retrofit_agent.train.world.scene import Projection, Scene, Thing, tunnel_section

KEY_MIN_HEIGHT = 0.10  # a sampled label's first instance covers at least this much of the height
_FOG_LIMIT = 0.45
_TRIES = 40
_SPEED_LIMITS = (20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120)

# Colour pools (BGR). Wide on purpose: a label must never be one exact colour. Lamp colours
# jitter around their state's hue (a red lamp stays red; its exact value does not repeat).
_LAMPS = {"red": (40, 35, 250), "yellow": (0, 185, 255), "green": (150, 250, 60)}
_SKIN = ((60, 90, 140), (90, 130, 190), (120, 160, 220), (80, 110, 160), (45, 65, 100), (140, 180, 230))
_TROUSERS = ((40, 30, 30), (110, 60, 30), (50, 50, 50), (90, 110, 120), (30, 40, 70), (160, 160, 160), (20, 20, 20))
_CAR = (
    (235, 235, 235),
    (25, 25, 25),
    (170, 170, 170),
    (40, 40, 190),
    (150, 70, 20),
    (60, 110, 40),
    (30, 140, 210),
    (110, 110, 110),
    (100, 40, 100),
    (200, 170, 90),
)
_TRUCK_BOX = ((225, 225, 225), (200, 200, 195), (40, 90, 200), (160, 90, 40), (60, 60, 60), (40, 160, 60))
_BUS = ((30, 170, 240), (200, 90, 30), (40, 40, 200), (230, 230, 230), (60, 150, 60), (20, 200, 230))


def _bright(rng: np.random.Generator) -> tuple[int, int, int]:
    """A clothing colour: any hue, mostly saturated, so people stand out but vary."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.35, 1.0))
    return int(b * 255), int(g * 255), int(r * 255)


def _pick(rng: np.random.Generator, pool: tuple) -> tuple[int, int, int]:
    base = np.array(pool[int(rng.integers(0, len(pool)))], dtype=float)
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))  # type: ignore[return-value]


@dataclass
class Placer:
    """Placement state for one scene: its projection, road edges and what is placed so far."""

    rng: np.random.Generator
    scene: Scene
    placed: list[Thing] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = self.scene.conditions
        self.proj = Projection.of(self.scene)
        half = c.lanes * c.lane_width_m / 2
        self.xl, self.xr = c.road_offset_m - half, c.road_offset_m + half
        self.tunnel_inside = c.scene == "tunnel" and c.tunnel_start_m <= 0
        self.max_z = 0.6 * c.fog_m  # keeps a key instance's fog blend under _FOG_LIMIT
        if c.scene == "tunnel" and c.tunnel_start_m > 0:
            self.max_z = min(self.max_z, c.tunnel_start_m - 1.0)

    # ------------------------------------------------------------------ generic

    def depth_for(self, height_m: float, frac: float) -> float:
        """Depth at which something ``height_m`` tall covers ``frac`` of the image height."""
        return self.proj.f * height_m / (frac * self.scene.height)

    def fits(self, t: Thing, key: bool) -> bool:
        x0, y0, x1, y1 = self.proj.box(t)
        W, H = self.scene.width, self.scene.height
        if x0 < 0 or x1 > W or y0 < 0 or y1 > H or t.z < 1.5:
            return False
        if key and ((y1 - y0) < KEY_MIN_HEIGHT * H or fog_factor(t.z, self.scene.conditions.fog_m) > _FOG_LIMIT):
            return False
        for o in self.placed:
            ox0, oy0, ox1, oy1 = self.proj.box(o)
            w, h = min(x1, ox1) - max(x0, ox0), min(y1, oy1) - max(y0, oy0)
            if w <= 0 or h <= 0:
                continue
            inter = w * h
            # Whichever is behind must stay mostly visible (solid things hide what is behind).
            back, back_area = (t, (x1 - x0) * (y1 - y0)) if o.z < t.z else (o, (ox1 - ox0) * (oy1 - oy0))
            front = o if back is t else t
            if front.kind in ("vehicle", "pedestrian", "cyclist", "barrier") and inter > 0.2 * back_area:
                return False
            smaller = min((x1 - x0) * (y1 - y0), (ox1 - ox0) * (oy1 - oy0))
            if abs(o.z - t.z) < 1.0 and inter > 0.05 * smaller:
                return False  # two things in the same spot
            if inter > 0.3 * smaller and not (t.kind == o.kind == "cone"):
                return False  # a sign half behind another reads as neither
        return True

    def place(self, propose: Callable[[float], Thing | None], count: int, key: bool = True) -> list[Thing]:
        """Place up to ``count`` instances from ``propose(relax)``; with ``key`` the first must
        be legible, the others are added when they fit. ``relax`` grows over the tries (0 → 1)."""
        out: list[Thing] = []
        for i in range(count):
            for attempt in range(_TRIES):
                t = propose(attempt / _TRIES)
                if t is not None and self.fits(t, key=key and i == 0):
                    self.placed.append(t)
                    out.append(t)
                    break
        return out

    def frac_depth(self, height_m: float, lo: float, hi: float, relax: float) -> float:
        """A depth at which ``height_m`` covers lo..hi of the image height, inside the fog
        limit (tightened as ``relax`` grows) and far enough for the base to be in frame."""
        z = self.depth_for(height_m, self.rng.uniform(lo, hi))
        z = min(z, self.max_z * (1 - 0.5 * relax))
        return float(max(z, 1.05 * self.proj.near_z()))

    def pick_x(self, zones: list[tuple[float, float]], z: float, width: float) -> float | None:
        """A lateral position inside one of ``zones`` that keeps a ``width``-wide thing at
        depth ``z`` fully in frame, or None when no zone is visible at that depth."""
        p = self.proj
        drift = p.curvature * z * z
        lo = -p.cx * z / p.f - drift + width / 2 + 0.05
        hi = (self.scene.width - p.cx) * z / p.f - drift - width / 2 - 0.05
        spans = [(max(a, lo), min(b, hi)) for a, b in zones if min(b, hi) >= max(a, lo)]
        if not spans:
            return None
        a, b = spans[int(self.rng.integers(0, len(spans)))]
        return float(self.rng.uniform(a, b))

    def lane_x(self, lane: int) -> float:
        return self.xl + (lane + 0.5) * self.scene.conditions.lane_width_m

    def mount(self, z: float, size: float, lo: float, hi: float) -> float:
        """Elevation for a pole- or gantry-mounted box of ``size`` at depth ``z``: drawn in
        lo..hi, lowered where the picture's top edge (or a tunnel ceiling) would cut it."""
        top_room = (self.proj.horizon_y - 2) / self.proj.scale(z) + self.proj.cam_h  # elevation at row 2
        if self.tunnel_inside:
            top_room = min(top_room, tunnel_section(self.scene.conditions)[2] - 1.1)
        return float(max(0.3, min(self.rng.uniform(lo, hi), top_room - size)))

    # ------------------------------------------------------------------ zones

    def beside(self, inner: float, outer: float) -> list[tuple[float, float]]:
        """Both roadsides, ``inner``..``outer`` metres past the edges (inside a tunnel's walls)."""
        if self.tunnel_inside:
            wl, wr, _ = tunnel_section(self.scene.conditions)
            return [(wl + 0.2, self.xl - 0.2), (self.xr + 0.2, wr - 0.2)]
        return [(self.xl - outer, self.xl - inner), (self.xr + inner, self.xr + outer)]

    def on_road(self, margin: float) -> list[tuple[float, float]]:
        return [(self.xl + margin, self.xr - margin)]

    def walkable(self) -> list[tuple[float, float]]:
        c = self.scene.conditions
        if c.road_type == "parking":
            return [(self.xl - 4.0, self.xr + 4.0)]
        if c.road_type == "urban" and not self.tunnel_inside:
            sw = 2.5 + (c.palette[2] % 4) * 0.5  # the sidewalk the renderer draws
            return self.beside(0.3, sw - 0.3)
        if c.scene == "bridge":
            return self.beside(0.3, 1.8)
        return self.beside(0.4, 2.5)

    # ------------------------------------------------------------------ kinds

    def pedestrians(self, count: int, key: bool = True) -> list[Thing]:
        rng, c = self.rng, self.scene.conditions

        def propose(relax: float) -> Thing | None:
            h = float(rng.uniform(1.55, 1.9))
            crossing = (
                c.road_type in ("urban", "rural")
                and not self.tunnel_inside
                and rng.random() < (0.35 if c.road_type == "urban" else 0.2)
            )
            side = crossing or rng.random() < 0.4
            width = 0.6 if side else 0.5
            z = self.frac_depth(h, 0.11, 0.42, relax)
            x = self.pick_x(self.on_road(0.3) if crossing else self.walkable(), z, width)
            if x is None:
                return None
            return Thing(
                kind="pedestrian",
                label="present",
                x=x,
                z=z,
                width_m=width,
                height_m=h,
                view="side" if side else "front",
                colours=(_bright(rng), _pick(rng, _TROUSERS), _pick(rng, _SKIN), _bright(rng)),
                phase=float(rng.random()),
                facing_left=bool(rng.random() < 0.5),
            )

        return self.place(propose, count, key)

    def cyclists(self, count: int, key: bool = True) -> list[Thing]:
        rng, c = self.rng, self.scene.conditions

        def propose(relax: float) -> Thing | None:
            h = float(rng.uniform(1.65, 1.85))
            length = float(1.75 * rng.uniform(0.8, 1.0))
            z = self.frac_depth(h, 0.12, 0.4, relax)
            if c.road_type == "parking":
                zones = [(self.xl - 3.0, self.xr + 3.0)]
            elif rng.random() < 0.3 and not self.tunnel_inside and c.scene != "bridge":
                zones = self.on_road(0.5)  # crossing
            else:  # riding along either edge of the road
                zones = [(self.xl + 0.5, self.xl + 1.3), (self.xr - 1.3, self.xr - 0.5)]
            x = self.pick_x(zones, z, length)
            if x is None:
                return None
            return Thing(
                kind="cyclist",
                label="present",
                x=x,
                z=z,
                width_m=length,
                height_m=h,
                view="side",
                colours=(_bright(rng), _bright(rng), _pick(rng, _SKIN), _pick(rng, _TROUSERS)),
                phase=float(rng.random()),
                facing_left=bool(rng.random() < 0.5),
            )

        return self.place(propose, count, key)

    def traffic_lights(self, state: str, count: int, key: bool = True) -> list[Thing]:
        rng = self.rng
        housing = ((30, 30, 30), (25, 35, 40), (20, 80, 110), (60, 60, 60))

        def propose(relax: float) -> Thing | None:
            k = float(rng.uniform(1.1, 1.6))
            overhead = self.tunnel_inside or rng.random() < 0.35
            z = self.frac_depth(k, 0.11, 0.24, relax)
            x = self.pick_x(self.on_road(1.0) if overhead else self.beside(0.5, 1.6), z, 0.42 * k)
            if x is None:
                return None
            elev = self.mount(z, k, 4.5, 5.6) if overhead else self.mount(z, k, 2.2, 3.6)
            return Thing(
                kind="traffic_light",
                label=state,
                x=x,
                z=z,
                width_m=0.42 * k,
                height_m=k,
                elevation_m=elev,
                colours=(_pick(rng, housing), _pick(rng, (_LAMPS[state],))),
                pole_m=0.0 if overhead else elev,
            )

        return self.place(propose, count, key)

    def signs(self, kind: str, count: int, key: bool = True) -> list[Thing]:
        rng, c = self.rng, self.scene.conditions

        def propose(relax: float) -> Thing | None:
            d = float(rng.uniform(0.9, 1.45))
            z = self.frac_depth(d, 0.1, 0.22, relax)
            # Motorways hang signs on gantries over the lanes; elsewhere they stand beside the road.
            gantry = self.tunnel_inside or (c.road_type == "highway" and rng.random() < 0.35)
            x = self.pick_x(self.on_road(0.8) if gantry else self.beside(0.4, 2.0), z, d)
            if x is None:
                return None
            elev = self.mount(z, d, 4.6, 5.6) if gantry else self.mount(z, d, 1.4, 2.4)
            return Thing(
                kind="sign",
                label=kind,
                x=x,
                z=z,
                width_m=d,
                height_m=d,
                elevation_m=elev,
                pole_m=0.0 if gantry else elev,
                number=int(rng.choice(_SPEED_LIMITS)),
                colours=(_pick(rng, ((35, 30, 200), (45, 40, 180), (30, 20, 220))), _pick(rng, ((235, 235, 235),))),
            )

        return self.place(propose, count, key)

    def vehicles(self, kind: str, count: int, key: bool = True) -> list[Thing]:
        rng, c = self.rng, self.scene.conditions
        p_view = {
            "highway": (1.0, 0.0, 0.0),
            "urban": (0.5, 0.3, 0.2),
            "rural": (0.55, 0.15, 0.3),
            "parking": (0.35, 0.65, 0.0),
        }[c.road_type]
        two_way = c.road_type in ("urban", "rural")
        same_way = range(c.lanes // 2, c.lanes) if two_way else range(c.lanes)

        def propose(relax: float) -> Thing | None:
            view = str(rng.choice(["rear", "side", "front"], p=p_view))
            if view == "side" and c.road_type != "parking" and c.scene in ("tunnel", "bridge"):
                view = "rear"  # no junctions in tunnels or on bridges
            width, height, colour = _vehicle_size(rng, kind)
            length = width if view != "side" else _LENGTH[kind] * float(rng.uniform(0.9, 1.1))
            z = self.frac_depth(height, 0.12, 0.4, relax)
            if view == "rear":
                zones = [(self.lane_x(i) - 0.4, self.lane_x(i) + 0.4) for i in same_way]
                if c.road_type == "parking":
                    zones = self.on_road(0.3)
            elif view == "front":
                zones = [(self.lane_x(i) - 0.4, self.lane_x(i) + 0.4) for i in range(c.lanes // 2)]
            elif c.road_type == "parking":  # nose-in in a bay, seen side-on from the aisle
                zones = [(self.xl - 3.5, self.xl - 1.5), (self.xr + 1.5, self.xr + 3.5)]
            else:  # crossing at a junction ahead
                zones = self.on_road(0.5)
            x = self.pick_x(zones, z, length)
            if x is None:
                return None
            return Thing(
                kind="vehicle",
                label=kind,
                x=x,
                z=z,
                width_m=float(length),
                height_m=height,
                view=view,  # type: ignore[arg-type]
                colours=(colour, _bright(rng)),
                facing_left=bool(rng.random() < 0.5),
                phase=float(rng.random()),
            )

        return self.place(propose, count, key)

    def roadworks(self) -> list[Thing]:
        """A line of cones along a lane line near the camera, and barriers closing a lane."""
        rng, c = self.rng, self.scene.conditions
        lines = [self.xl + k * c.lane_width_m for k in range(1, c.lanes)] + [self.xl + 0.4, self.xr - 0.4]
        lines = sorted(lines, key=abs)[:3]  # the lines nearest the camera can be seen up close
        h = float(rng.uniform(0.75, 1.0))
        line = lines[0]

        def first(relax: float) -> Thing | None:
            nonlocal line
            line = lines[int(rng.integers(0, len(lines)))]
            z = self.frac_depth(h, 0.1, 0.2, relax)
            x = self.pick_x([(line - 0.15, line + 0.15)], z, 0.55 * h)
            return None if x is None else _cone(rng, x, z, h)

        out = self.place(first, 1)
        if not out:
            return out
        z, gap = out[0].z, float(rng.uniform(2.5, 5.0))
        for _ in range(int(rng.integers(4, 10))):
            z += gap
            t = _cone(rng, line, z, h)
            if self.fits(t, key=False):
                self.placed.append(t)
                out.append(t)
        side = 1 if line <= (self.xl + self.xr) / 2 else -1  # close the lane on the road's wider side
        for _ in range(int(rng.integers(1, 3))):
            t = Thing(
                kind="barrier",
                label="construction_zone",
                x=float(line + side * c.lane_width_m * 0.5),
                z=float(out[0].z + rng.uniform(2, 12)),
                width_m=float(rng.uniform(1.6, 2.6)),
                height_m=float(rng.uniform(0.9, 1.2)),
                colours=(((0, 110, 255), (0, 200, 255))[int(rng.integers(0, 2))],),
            )
            if self.fits(t, key=False):
                self.placed.append(t)
                out.append(t)
        return out


_LENGTH = {"car": 4.4, "truck": 9.0, "bus": 11.5, "motorcycle": 2.1}


def _vehicle_size(rng: np.random.Generator, kind: str) -> tuple[float, float, tuple[int, int, int]]:
    if kind == "car":
        return 1.8, float(rng.uniform(1.35, 1.6)), _pick(rng, _CAR)
    if kind == "truck":
        return 2.5, float(rng.uniform(3.3, 3.9)), _pick(rng, _TRUCK_BOX)
    if kind == "bus":
        return 2.55, float(rng.uniform(3.0, 3.3)), _pick(rng, _BUS)
    return 0.9, float(rng.uniform(1.45, 1.6)), _pick(rng, _CAR)  # motorcycle with its rider


def _cone(rng: np.random.Generator, x: float, z: float, h: float) -> Thing:
    return Thing(
        kind="cone",
        label="construction_zone",
        x=float(x),
        z=float(z),
        width_m=0.55 * h,
        height_m=float(h),
        colours=((0, int(rng.integers(90, 150)), 255),),
    )


def place_things(rng: np.random.Generator, scene: Scene, labels: dict[str, str]) -> list[Thing]:
    """Instances for every object label in ``labels`` (and cones for a construction zone)."""
    p = Placer(rng, scene)
    counts = {
        "traffic_light": int(rng.integers(1, 3)),
        "signs": int(rng.integers(1, 3)),
        "pedestrians": int(rng.choice([1, 1, 2, 3, 4])),
        "cyclists": int(rng.choice([1, 1, 2])),
        "vehicles": int(rng.choice([1, 1, 2, 3])),
    }
    adders = {
        "traffic_light": lambda n, key: p.traffic_lights(labels["traffic_light"], n, key),
        "signs": lambda n, key: p.signs(labels["signs"], n, key),
        "vehicles": lambda n, key: p.vehicles(labels["vehicles"], n, key),
        "pedestrians": lambda n, key: p.pedestrians(n, key),
        "cyclists": lambda n, key: p.cyclists(n, key),
    }
    wanted = [g for g in adders if labels[g] not in ("none", "absent")]
    things: list[Thing] = []
    # Every label's first, legible instance before any extra one: extras only fill the gaps
    # left, so a crowd never pushes the only traffic light out of the picture.
    for g in wanted:
        things += adders[g](1, True)
    if labels["scene"] == "construction_zone":
        things += p.roadworks()
    for g in wanted:
        things += adders[g](counts[g] - 1, False)
    # Far to near is the painter's order the renderer needs anyway.
    return sorted(things, key=lambda t: -t.z)
