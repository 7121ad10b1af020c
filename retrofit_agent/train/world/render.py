"""Scene → BGR image, painted back to front at the scene's own size.

Order: sky and horizon, the ground (lit row by row), the scene's structures and the
roadside, then the labelled instances far to near, then light halos, weather in the air and
the sensor. Rendering at the requested size (no big canvas scaled down) keeps a 160-pixel
picture to a few milliseconds.
"""

from __future__ import annotations

import cv2
import numpy as np

from retrofit_agent.train.world import effects, figures
from retrofit_agent.train.world.annotate import inside_tunnel
from retrofit_agent.train.world.canvas import Canvas
from retrofit_agent.train.world.ground import far_horizon, ground, light_ground, sky
from retrofit_agent.train.world.look import Look
from retrofit_agent.train.world.props import roadside
from retrofit_agent.train.world.scene import Projection, Scene
from retrofit_agent.train.world.structures import Tunnel, bridge


def render(scene: Scene) -> np.ndarray:
    """The scene as an ``(height, width, 3)`` BGR uint8 image (before JPEG compression)."""
    c = scene.conditions
    inside = inside_tunnel(scene)
    half = c.lanes * c.lane_width_m / 2
    cv = Canvas(
        img=np.empty((scene.height, scene.width, 3), np.uint8),
        scene=scene,
        proj=Projection.of(scene),
        look=Look.of(scene, inside_tunnel=inside),
        rng=np.random.default_rng([scene.seed, 7]),
        xl=c.road_offset_m - half,
        xr=c.road_offset_m + half,
    )
    z0, z1 = cv.visible_range()
    things = sorted(scene.things, key=lambda t: -t.z)
    if inside:
        cv.img[:] = (40, 40, 42)
        Tunnel(cv).draw_inside(cv, z0)
    else:
        sky(cv)
        far_horizon(cv)
        ground(cv)
        light_ground(cv)
        props_end = z1
        if c.scene == "tunnel":  # the portal ahead: a dark arch in a hill and a concrete face
            tunnel = Tunnel(cv)
            tunnel.draw_inside(cv, tunnel.start, dim=0.45)
            for thing in (t for t in things if t.z > tunnel.start):  # seen through the arch, or hidden
                figures.draw(cv, thing)
            tunnel.draw_portal(cv)
            props_end = tunnel.start
            things = [t for t in things if t.z <= tunnel.start]
        if c.scene == "bridge":
            bridge(cv, z0, z1)
        else:
            roadside(cv, z0, props_end)
    for thing in things:
        figures.draw(cv, thing)
    effects.add_glows(cv, cv.look.wet)
    if not inside:
        if c.weather == "rain":
            effects.rain(cv)
        elif c.weather == "snow":
            effects.snow(cv)
        elif c.weather == "fog":
            effects.fog_veil(cv)
    effects.sensor(cv)
    return cv.img


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes at ``quality`` (the scene's sensor draws it, so artefacts vary per image)."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
