"""The demo world: flat-coloured shapes on varied backgrounds, rendered with their ground truth.

Every object is one flat colour with an anti-aliased silhouette (``alpha``), so a scene's pixels
are exactly ``background * (1 - alpha) + colour * alpha``: what the toy benchmark records as
truth, and what the scores can check an edit against. Colours are drawn from the whole RGB
cube, backgrounds from five kinds (flat, gradient, stripes, checker, smooth blobs), so a model
trained here has to read the exemplar rather than learn a few fixed colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "ring")
BACKGROUNDS = ("flat", "gradient", "stripes", "checker", "blobs")
SUPERSAMPLE = 4  # silhouettes are drawn at 4x and box-filtered down: anti-aliased edges
MIN_CONTRAST = 0.3  # an object's colour is at least this far (RGB in [0, 1]) from its background
# A background's second colour differs from its first by this much per channel (std): varied
# backgrounds whose patterns stay calmer than the objects on them.
BACKGROUND_SPREAD = 0.2
# An object's box side, as a fraction of the scene side: large, so that the hole's object
# (which only the exemplar shows) is much of what a training step has to paint.
OBJECT_SIDES = (0.4, 0.7)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: tuple[float, float, float]  # RGB in [0, 1]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in scene pixels


@dataclass
class Scene:
    pixels: np.ndarray  # (S, S, 3) float in [0, 1]
    background: np.ndarray  # the same scene without its objects
    objects: list[WorldObject]
    kind: str  # background kind

    def image(self) -> Image.Image:
        return to_image(self.pixels)


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


# --- silhouettes ----------------------------------------------------------------------------
def silhouette(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """``(size, size)`` float alpha in [0, 1] of ``shape`` filling ``box`` (scene pixels)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}")
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "star":
        angles = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = [(cx + r * rx * np.cos(a), cy + r * ry * np.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(points, fill=255)
    else:  # ring: the background shows through its middle
        draw.ellipse((x0, y0, x1, y1), fill=255)
        draw.ellipse((cx - rx * 0.5, cy - ry * 0.5, cx + rx * 0.5, cy + ry * 0.5), fill=0)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


# --- backgrounds ----------------------------------------------------------------------------
def random_colour(rng: np.random.Generator) -> np.ndarray:
    """Uniform in the RGB cube: every hue, saturation and brightness."""
    return rng.uniform(0, 1, 3)


def background(
    rng: np.random.Generator, size: int, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """``(size, size, 3)`` in [0, 1] and its kind: two colours laid out one of five ways."""
    kind = kind or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    first = random_colour(rng)
    second = np.clip(first + rng.normal(0, BACKGROUND_SPREAD, 3), 0, 1)
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    if kind == "flat":
        t = np.zeros((size, size))
    elif kind == "gradient":
        t = (along - along.min()) / (along.max() - along.min())
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.sin(along * rng.uniform(6, 20) + rng.uniform(0, 2 * np.pi))
    elif kind == "checker":
        cells = rng.integers(3, 7)
        t = ((np.floor(xs * cells) + np.floor(ys * cells)) % 2).astype(np.float64)
    elif kind == "blobs":
        coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        t = np.clip(t, 0, 1)
    else:
        raise ValueError(f"unknown background {kind!r}: use one of {BACKGROUNDS}")
    pixels = first * (1 - t[..., None]) + second * t[..., None]
    pixels = pixels + rng.normal(0, rng.uniform(0, 0.025), pixels.shape)
    return np.clip(pixels, 0, 1), kind


# --- objects and scenes ---------------------------------------------------------------------
def random_box(
    rng: np.random.Generator, size: int, side_range: tuple[float, float] = OBJECT_SIDES
) -> tuple[float, float, float, float]:
    side = rng.uniform(*side_range) * size
    aspect = rng.uniform(0.65, 1.55)
    w, h = side * aspect**0.5, side / aspect**0.5
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return (x0, y0, x0 + w, y0 + h)


def overlap(a: tuple[float, ...], b: tuple[float, ...], margin: float = 0.0) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least ``MIN_CONTRAST`` from the mean background ``under`` the object."""
    mean = under.reshape(-1, 3).mean(0)
    for _ in range(100):
        colour = random_colour(rng)
        if np.linalg.norm(colour - mean) >= MIN_CONTRAST:
            return colour
    return 1 - mean  # the far corner of the cube: always contrasting enough


def paint_object(pixels: np.ndarray, thing: WorldObject) -> np.ndarray:
    alpha = silhouette(thing.shape, thing.box, pixels.shape[0])[..., None]
    return pixels * (1 - alpha) + np.asarray(thing.colour) * alpha


def place_objects(
    rng: np.random.Generator,
    base: np.ndarray,
    count: int,
    avoid: list[tuple[float, ...]] | None = None,
    shapes: list[str] | None = None,
    colours: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[WorldObject]]:
    """Up to ``count`` objects that overlap neither each other nor ``avoid``."""
    size = base.shape[0]
    pixels, objects, taken = base.copy(), [], list(avoid or [])
    for index in range(count):
        for _ in range(30):
            box = random_box(rng, size)
            if not any(overlap(box, other, margin=2) for other in taken):
                break
        else:
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = shapes[index] if shapes else SHAPES[rng.integers(len(SHAPES))]
        colour = colours[index] if colours else contrasting_colour(rng, base[y0:y1, x0:x1])
        thing = WorldObject(shape, tuple(float(c) for c in colour), tuple(float(v) for v in box))
        pixels = paint_object(pixels, thing)
        objects.append(thing)
        taken.append(box)
    return pixels, objects


def random_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 2) -> Scene:
    """A training scene: a background and 1 to ``max_objects`` non-overlapping objects."""
    base, kind = background(rng, size)
    pixels, objects = place_objects(rng, base, int(rng.integers(1, max_objects + 1)))
    return Scene(pixels, base, objects, kind)
