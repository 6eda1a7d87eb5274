"""The toy world: a seeded procedural renderer of captioned 32x32 images with exact ground truth.

One image holds one object (a shape, a colour, a pattern) at one of nine positions on a
background (a colour, as a plain wall or with a floor band). Captions come from a small
vocabulary, e.g. "a red striped star on a blue floor, top left". Because the renderer
knows every pixel's role (object, pattern, background), fidelity of generated images can
be measured exactly (metrics.py). This is the project's stand-in for the DreamBooth data
set of the TuneQDM paper (arXiv 2401.04339, section 4), which cannot be downloaded here.

Why 32x32: a text-to-image base must train on 2 CPU cores in well under two hours, and
the later comparison trains dozens of fine-tunings. At 32 px the UNet runs on 32x32x4
latents (the VAE does not downsample, vae.py; a 1.7 M-parameter UNet takes ~0.39 s per
batch-32 training step on 2 cores); 64 px would cost 4x per step. 32 px still leaves
room for six shapes at 10-14 px and patterns with an 8-px period (4-px bands, dots and
checks).

Patterns lie on the image's grid (anchored at pixel (0, 0), not at the object), 8 px a
period. The first world drew 2-px bands anchored at each object's corner, and no base
trained here learnt to draw them (pattern accuracy 0.50); coarser patterns on one fixed
grid line up with the UNet's own 2x downsamplings: a 4-px band is one cell of its 8x8
level, where the caption enters (docs/toyworld_history.md, "Patterns").

Colours: each named colour has a main RGB value and a "shade" (darker, or lighter for
black) used for patterns on objects and for the floor band of a scene. A pixel's colour
name is the name of the nearest of the 16 main and shade values (metrics.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 32
# Patterns repeat every PATTERN_PERIOD px, half of it in the shade (pattern_mask).
PATTERN_PERIOD = 8

# name -> (main RGB, shade RGB). Shades are 0.6x the main value (black: a grey).
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((220, 40, 40), (132, 24, 24)),
    "orange": ((245, 140, 20), (147, 84, 12)),
    "yellow": ((240, 220, 40), (144, 132, 24)),
    "green": ((40, 170, 60), (24, 102, 36)),
    "blue": ((40, 80, 220), (24, 48, 132)),
    "purple": ((140, 50, 190), (84, 30, 114)),
    "white": ((240, 240, 240), (150, 150, 150)),
    "black": ((20, 20, 20), (90, 90, 90)),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# "plain" has no word in captions ("a red star"); the others are adjectives.
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
# "background": one flat colour. "floor": the same, with the bottom rows in the shade.
SCENES: tuple[str, ...] = ("background", "floor")
FLOOR_TOP = 22  # first row of the floor band

# position phrase -> object centre (x, y) in pixels; a 3x3 grid of centres 6 px apart,
# so that an 18-px object with its jitter stays inside the image.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (10, 10), "top": (16, 10), "top right": (22, 10),
    "left": (10, 16), "center": (16, 16), "right": (22, 16),
    "bottom left": (10, 22), "bottom": (16, 22), "bottom right": (22, 22),
}
# A centroid's column (row) is left (top) below 13, right (bottom) from 19 on.
POSITION_BOUNDARIES = (13.0, 19.0)
SIZES = (16, 17, 18)  # object box side in pixels (docs/toyworld.md "The world")
JITTER = 1  # centres move by up to this many pixels in x and y

# Rare tokens ("sks"-style) for subjects: single tokens of the tokenizer that no base
# caption ever uses, so their embeddings stay at their random initialisation.
RARE_TOKENS: tuple[str, ...] = (
    "sks", "zwx", "qvt", "pxr", "bnk", "vjd", "xqz", "kmw",
    "hjy", "fyq", "wqp", "jxv", "dzk", "gqx", "tvz", "ykf",
)
# Every word a caption or prompt may use: one token each in the base's tokenizer.
VOCABULARY: tuple[str, ...] = (
    "a", "on", "photo", "of", *COLOUR_NAMES, *SHAPES, *PATTERNS[1:], *SCENES,
    "top", "bottom", "left", "right", "center", *RARE_TOKENS,
)


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image. Positions are pixel coordinates, y down."""

    shape: str
    colour: str
    pattern: str
    background: str
    scene: str
    position: str
    size: int
    centre_x: int
    centre_y: int

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES), ("colour", self.colour, COLOUR_NAMES),
            ("pattern", self.pattern, PATTERNS), ("background", self.background, COLOUR_NAMES),
            ("scene", self.scene, SCENES), ("position", self.position, tuple(POSITIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"Scene.{field}={value!r}; allowed: {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"object and background are both {self.colour!r}; they must differ")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Rendering:
    """A rendered image and its ground truth.

    image: (H, W, 3) uint8 RGB. object_mask: (H, W) bool, the object's pixels.
    pattern_mask: (H, W) bool, object pixels drawn in the shade (subset of object_mask).
    """

    scene: Scene
    image: np.ndarray
    object_mask: np.ndarray
    pattern_mask: np.ndarray

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) mean of the object's pixel centres."""
        ys, xs = np.nonzero(self.object_mask)
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def _pixel_centres(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every pixel centre, each (size, size) float64."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xs, ys


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: list[tuple[float, float]]):
    """Even-odd point-in-polygon test, vectorised over points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (u1, v1), (u2, v2) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        crosses = (v1 > v) != (v2 > v)
        u_at = (u2 - u1) * (v - v1) / (v2 - v1 + 1e-12) + u1
        inside ^= crosses & (u < u_at)
    return inside


_STAR = [
    (radius * np.cos(np.radians(-90 + 36 * k)), radius * np.sin(np.radians(-90 + 36 * k)))
    for k, radius in zip(range(10), [1.0, 0.45] * 5, strict=True)
]
_TRIANGLE = [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)]


def shape_mask(shape: str, centre_x: float, centre_y: float, size: float,
               image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool: pixels whose centre lies in the shape.

    The shape fills a box of side `size` centred on (centre_x, centre_y); inside it,
    normalised coordinates u, v run from -1 to 1 (v down).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(SHAPES)}")
    xs, ys = _pixel_centres(image_size)
    u, v = (xs - centre_x) / (size / 2), (ys - centre_y) / (size / 2)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        arm, reach = 0.34, 0.95
        return (((np.abs(u) <= arm) & (np.abs(v) <= reach))
                | ((np.abs(v) <= arm) & (np.abs(u) <= reach)))
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    return _inside_polygon(u, v, _TRIANGLE)


def pattern_mask(pattern: str, origin_x: int = 0, origin_y: int = 0,
                 image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool: where `pattern` paints the shade, period
    PATTERN_PERIOD (8 px), anchored at pixel (origin_x, origin_y) (render: the image's
    (0, 0); the metrics try every phase)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}; allowed: {', '.join(PATTERNS)}")
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    half = PATTERN_PERIOD // 2
    lx, ly = (xs - origin_x) % PATTERN_PERIOD, (ys - origin_y) % PATTERN_PERIOD
    if pattern == "striped":  # horizontal bands, half a period shade, half main
        return ly >= half
    if pattern == "dotted":  # square dots of half a period
        return (lx >= half) & (ly >= half)
    if pattern == "checkered":  # square cells of half a period
        return (lx >= half) != (ly >= half)
    return np.zeros((image_size, image_size), dtype=bool)


def pattern_origin(scene: Scene) -> tuple[int, int]:
    """Pixel (x, y) where `scene`'s pattern is anchored: the image's (0, 0), so every
    pattern lies on one fixed grid (module doc)."""
    return 0, 0


def render(scene: Scene) -> Rendering:
    """Draw `scene` (no anti-aliasing: every pixel is exactly one palette value)."""
    main_bg, shade_bg = (np.array(c, dtype=np.uint8) for c in COLOURS[scene.background])
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = main_bg
    if scene.scene == "floor":
        image[FLOOR_TOP:] = shade_bg
    obj = shape_mask(scene.shape, scene.centre_x, scene.centre_y, scene.size)
    shade = obj & pattern_mask(scene.pattern, *pattern_origin(scene))
    main_obj, shade_obj = COLOURS[scene.colour]
    image[obj] = main_obj
    image[shade] = shade_obj
    return Rendering(scene=scene, image=image, object_mask=obj, pattern_mask=shade)


def caption(scene: Scene, with_colour: bool = True, with_background: bool = True,
            with_position: bool = True, token: str | None = None) -> str:
    """The scene's caption, e.g. "a red striped star on a blue floor, top left".

    With `token`, the object is named by the token and its class noun instead of its
    colour and pattern ("a sks star on a blue floor, top left").
    """
    if token is not None:
        words = ["a", token, scene.shape]
    else:
        words = ["a"]
        if with_colour:
            words.append(scene.colour)
        if scene.pattern != "plain":
            words.append(scene.pattern)
        words.append(scene.shape)
    text = " ".join(words)
    if with_background:
        text += f" on a {scene.background} {scene.scene}"
    if with_position:
        text += f", {scene.position}"
    return text


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for; None where it does not say."""

    shape: str | None = None
    colour: str | None = None
    pattern: str | None = None
    background: str | None = None
    scene: str | None = None
    position: str | None = None
    token: str | None = None


_POSITION_RE = re.compile(r",\s*(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\s*$")


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption of `caption`'s grammar back into a CaptionSpec.

    Words it does not know before the shape are taken as the subject token
    ("a sks star ..."); a caption without a shape word raises ValueError.
    """
    text = text.strip().lower()
    position = None
    match = _POSITION_RE.search(text)
    if match:
        position = match.group(1)
        text = text[: match.start()]
    words = re.findall(r"[a-z0-9_]+", text)
    shape_at = next((i for i, w in enumerate(words) if w in SHAPES), None)
    if shape_at is None:
        raise ValueError(f"caption {text!r} names no shape; shapes: {', '.join(SHAPES)}")
    colour = pattern = token = None
    for word in words[:shape_at]:
        if word in COLOURS:
            colour = word
        elif word in PATTERNS:
            pattern = word
        elif word not in ("a", "photo", "of"):
            token = word
    if pattern is None and token is None and colour is not None:
        pattern = "plain"
    background = scene = None
    rest = words[shape_at + 1:]
    if "on" in rest:
        after = rest[rest.index("on") + 1:]
        background = next((w for w in after if w in COLOURS), None)
        scene = next((w for w in after if w in SCENES), None)
    return CaptionSpec(shape=words[shape_at], colour=colour, pattern=pattern,
                       background=background, scene=scene, position=position, token=token)


def sample_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 pattern: str | None = None, background: str | None = None,
                 scene: str | None = None, position: str | None = None) -> Scene:
    """A random scene; any argument given is kept fixed. Uniform over the rest
    (the background is drawn among colours other than the object's)."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    pattern = pattern or PATTERNS[rng.integers(len(PATTERNS))]
    colour = colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    if background is None:
        others = [c for c in COLOUR_NAMES if c != colour]
        background = others[rng.integers(len(others))]
    scene = scene or SCENES[rng.integers(len(SCENES))]
    position = position or tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    base_x, base_y = POSITIONS[position]
    size = int(SIZES[rng.integers(len(SIZES))])
    jitter_x, jitter_y = rng.integers(-JITTER, JITTER + 1, size=2)
    return Scene(shape=shape, colour=colour, pattern=pattern, background=background,
                 scene=scene, position=position, size=size,
                 centre_x=int(base_x + jitter_x), centre_y=int(base_y + jitter_y))
