"""Fidelity of generated toy-world images, measured from pixels against exact ground truth.

Every function takes ONE image (PIL image or (H, W, 3) array; uint8, or float in [0, 1])
so a benchmark can score each generated image and aggregate as it likes. Images of
another size are resized to 32x32 (PIL box filter) first.

How an image is read (`analyse`):
1. each pixel gets the name of the nearest (Euclidean RGB) of the world's 16 palette
   values (8 colours x {main, shade}), and a flag for "shade";
2. background colour = the most common name over all pixels (objects cover at most
   ~19% of the image);
3. object = the largest 8-connected region of pixels not named the background colour,
   plus every other non-background pixel inside its bounding box grown by 2 px (so a
   star's 1-pixel tips stay attached);
4. object colour = the most common name among object pixels (main and shade count for
   the same name); position = the 3x3 cell of the centre of the object's bounding box
   (columns split at x = 13 and 19 px, rows likewise, as world.POSITION_BOUNDARIES;
   the box centre, not the centroid: a triangle's centroid sits low in its box, and
   with cells 6 px apart it would read a few rendered triangles a row too low).

Prompt fidelity (`prompt_fidelity`), per image: for each attribute the prompt names,
True if the image shows it: background colour (step 2), object colour (step 4),
position (step 4) and shape (the shape whose best fitted mask has the highest IoU with
the object, see below). `score` is the fraction of named attributes shown; the base's
acceptance test counts an image correct when background AND object colour are right.

Subject fidelity (`subject_fidelity`), per image, against the subject's true shape,
pattern and colour, each in [0, 1], and `score` their mean:
- colour: fraction of object pixels named the subject's colour;
- shape: 1 if the subject's shape fits the object at least as well as every other
  shape, else 0. A shape's fit is the best IoU between the object mask and the shape
  drawn by world.shape_mask over integer centres within 2 px of the object's
  bounding-box centre and sizes from the box side - 2 to box side / 0.8 + 2 (kept as
  `shape_iou`; at 32 px a circle and a square overlap with IoU ~0.9, so the IoU alone
  barely separates shapes);
- pattern: inside the object, the IoU between the pixels drawn in a shade and the
  subject's pattern mask, best over the pattern's 64 phases (period 8 px); for a plain
  subject, 1 - the fraction of object pixels in a shade.
All three are exactly 1.0 on the renderer's own images of the subject, at any
position, size, background and scene. An image with no object scores 0.

Colour and pattern are also read on the object's *interior* (`interior_colour`,
`interior_pattern`, `interior_score`; the object minus its 1-px outline, `interior`),
a diagnostic beside the score, not a replacement: a generated edge pixel is often a
blend of object and background named a third colour (purple on green reads grey),
and the outline is 47% of a rendered star's pixels, 20-37% of the other shapes'
(docs/toyworld.md "Edges"). The two readings together say whether a method missed
the subject's colour and pattern or drew them with soft edges.

The embedding metrics of DreamBooth (DINO, CLIP-I, CLIP-T) are in embeddings.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .subjects import Subject
from .world import (
    COLOUR_NAMES,
    COLOURS,
    IMAGE_SIZE,
    PATTERN_PERIOD,
    PATTERNS,
    POSITION_BOUNDARIES,
    POSITIONS,
    SHAPES,
    CaptionSpec,
    parse_caption,
    pattern_mask,
    shape_mask,
)

# (16, 3): the 8 main values, then the 8 shades; index % 8 is the colour's index.
_PALETTE = np.array([main for main, _ in COLOURS.values()]
                    + [shade for _, shade in COLOURS.values()], dtype=np.float32)
_GROW = 2  # px added around the largest region's box when collecting the object


def to_world_array(image) -> np.ndarray:
    """(32, 32, 3) uint8 RGB from a PIL image or an (H, W, 3) uint8 / float [0, 1] array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3), got shape {array.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
            return array
        pil = Image.fromarray(array)
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.uint8)


@dataclass(frozen=True)
class ImageAnalysis:
    """What `analyse` reads from one image. Arrays are (32, 32)."""

    colour_index: np.ndarray  # int, index into COLOUR_NAMES of each pixel's nearest value
    shade: np.ndarray  # bool, pixel nearest to a shade value
    background: str
    object_mask: np.ndarray  # bool; all False when no object was found
    object_colour: str | None
    centroid: tuple[float, float] | None  # (x, y) in pixels
    position: str | None


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a (H, W) bool mask (0 = outside) and their count."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels, count


def _cell(value: float) -> int:
    low, high = POSITION_BOUNDARIES
    return 0 if value < low else (1 if value < high else 2)


_CELL_TO_POSITION = {(_cell(x), _cell(y)): name for name, (x, y) in POSITIONS.items()}


def analyse(image) -> ImageAnalysis:
    """Read background, object, object colour and position from an image (see module doc)."""
    pixels = to_world_array(image).astype(np.float32)
    distance = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, 16)
    nearest = distance.argmin(-1)
    colour_index = nearest % len(COLOUR_NAMES)
    shade = nearest >= len(COLOUR_NAMES)
    background_index = int(np.bincount(colour_index.ravel(), minlength=len(COLOUR_NAMES)).argmax())
    foreground = colour_index != background_index
    labels, count = _components(foreground)
    if count == 0:
        empty = np.zeros_like(foreground)
        return ImageAnalysis(colour_index, shade, COLOUR_NAMES[background_index], empty,
                             None, None, None)
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(labels == largest)
    window = np.zeros_like(foreground)
    window[max(ys.min() - _GROW, 0): ys.max() + _GROW + 1,
           max(xs.min() - _GROW, 0): xs.max() + _GROW + 1] = True
    object_mask = foreground & window
    object_colour = COLOUR_NAMES[int(np.bincount(colour_index[object_mask],
                                                 minlength=len(COLOUR_NAMES)).argmax())]
    ys, xs = np.nonzero(object_mask)
    centroid = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    box_x, box_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    position = _CELL_TO_POSITION[(_cell(box_x), _cell(box_y))]
    return ImageAnalysis(colour_index, shade, COLOUR_NAMES[background_index], object_mask,
                         object_colour, centroid, position)


def _iou(a: np.ndarray, b: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    union = (a | b).sum(axes)
    return np.where(union > 0, (a & b).sum(axes) / np.maximum(union, 1), 1.0)


@functools.lru_cache(maxsize=512)
def _shape_canvas(shape: str, size: int) -> np.ndarray:
    """(3 * 32, 3 * 32) bool: `shape` of `size` centred at pixel corner (48, 48). A
    32x32 window of it is world.shape_mask at any integer centre (a pure shift)."""
    return shape_mask(shape, 1.5 * IMAGE_SIZE, 1.5 * IMAGE_SIZE, size, image_size=3 * IMAGE_SIZE)


def _shifted_masks(shape: str, candidates: np.ndarray) -> np.ndarray:
    """(K, 32, 32) bool masks for integer (centre_x, centre_y, size) rows of `candidates`."""
    offset = IMAGE_SIZE + IMAGE_SIZE // 2
    masks = np.empty((len(candidates), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for k, (x, y, size) in enumerate(candidates):
        top, left = offset - int(y), offset - int(x)
        masks[k] = _shape_canvas(shape, int(size))[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    return masks


def fit_shape(object_mask: np.ndarray, shape: str) -> tuple[float, tuple[int, int, int]]:
    """Best IoU of `object_mask` with `shape` drawn by world.shape_mask, and its
    (centre_x, centre_y, size), searched as described in the module docstring."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(SHAPES)}")
    if not object_mask.any():
        return 0.0, (0, 0, 0)
    ys, xs = np.nonzero(object_mask)
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    box_x, box_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    offsets = np.arange(-2, 3)
    centre_x = np.clip(np.round(box_x) + offsets, 0, IMAGE_SIZE)
    centre_y = np.clip(np.round(box_y) + offsets, 0, IMAGE_SIZE)
    sizes = np.arange(max(side - 2, 2), min(int(side / 0.8) + 3, IMAGE_SIZE + 1))
    grid = np.stack(np.meshgrid(centre_x, centre_y, sizes, indexing="ij"), -1).reshape(-1, 3)
    ious = _iou(_shifted_masks(shape, grid.astype(np.int64)), object_mask[None])
    best = int(ious.argmax())
    return float(ious[best]), tuple(int(v) for v in grid[best])


def classify_shape(object_mask: np.ndarray) -> str | None:
    """The shape with the best fitted IoU, or None for an empty mask."""
    if not object_mask.any():
        return None
    return max(SHAPES, key=lambda shape: fit_shape(object_mask, shape)[0])


def pattern_score(object_mask: np.ndarray, shade: np.ndarray, pattern: str) -> float:
    """IoU of the object's shade pixels with `pattern` (best phase), see module doc."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}; allowed: {', '.join(PATTERNS)}")
    if not object_mask.any():
        return 0.0
    shaded = object_mask & shade
    if pattern == "plain":
        return float(1.0 - shaded.sum() / object_mask.sum())
    # A phase whose pattern misses the object entirely (a small star between two dots)
    # would score a plain object 1.0; such a phase never shows the pattern, and the
    # renderer never draws a patterned object without a shaded pixel.
    masks = (object_mask & pattern_mask(pattern, dx, dy)
             for dx in range(PATTERN_PERIOD) for dy in range(PATTERN_PERIOD))
    return max((float(_iou(shaded, mask)) for mask in masks if mask.any()), default=0.0)


def classify_pattern(object_mask: np.ndarray, shade: np.ndarray) -> str | None:
    """The pattern with the best `pattern_score` on the object ((32, 32) bool masks),
    or None for an empty mask. Ties go to the earlier of world.PATTERNS."""
    if not object_mask.any():
        return None
    return max(PATTERNS, key=lambda pattern: pattern_score(object_mask, shade, pattern))


@dataclass(frozen=True)
class PromptFidelity:
    """Per-image checks of what the prompt asked; None where the prompt did not ask."""

    background_ok: bool | None
    colour_ok: bool | None
    position_ok: bool | None
    shape_ok: bool | None

    @property
    def checks(self) -> dict[str, bool]:
        return {name: value for name, value in (
            ("background", self.background_ok), ("colour", self.colour_ok),
            ("position", self.position_ok), ("shape", self.shape_ok)) if value is not None}

    @property
    def score(self) -> float:
        """Fraction of the asked attributes shown (1.0 when nothing was asked)."""
        checks = self.checks
        return sum(checks.values()) / len(checks) if checks else 1.0

    @property
    def colours_ok(self) -> bool:
        """Background and object colour both as asked (the base's acceptance check)."""
        return bool(self.background_ok) and bool(self.colour_ok)


def prompt_fidelity(image, prompt: str | CaptionSpec, subject: Subject | None = None,
                    analysis: ImageAnalysis | None = None) -> PromptFidelity:
    """Check an image against its prompt (a caption string or a parsed CaptionSpec).

    A prompt naming a subject token ("a sks star ...") takes the expected object colour
    from `subject`. Pass `analysis` to reuse an `analyse(image)` result.
    """
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    analysis = analysis or analyse(image)
    colour = spec.colour
    if colour is None and subject is not None and spec.token == subject.token:
        colour = subject.colour
    return PromptFidelity(
        background_ok=None if spec.background is None else analysis.background == spec.background,
        colour_ok=None if colour is None else analysis.object_colour == colour,
        position_ok=None if spec.position is None else analysis.position == spec.position,
        shape_ok=None if spec.shape is None else classify_shape(analysis.object_mask) == spec.shape,
    )


@dataclass(frozen=True)
class SubjectFidelity:
    """How close the image's object is to the subject: colour, shape and pattern in
    [0, 1] (their mean is `score`); shape_iou is the fitted IoU behind `shape`;
    interior_colour and interior_pattern read the same on the object's interior
    (module doc), and interior_score is their mean with `shape`."""

    colour: float
    shape: float
    pattern: float
    shape_iou: float = 0.0
    interior_colour: float = 0.0
    interior_pattern: float = 0.0

    @property
    def score(self) -> float:
        return (self.colour + self.shape + self.pattern) / 3.0

    @property
    def interior_score(self) -> float:
        return (self.interior_colour + self.shape + self.interior_pattern) / 3.0


def interior(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` ((H, W) bool) whose 4 neighbours are all in it: the mask
    without its 1-px outline. A mask too thin to have an interior is returned whole."""
    padded = np.pad(mask, 1)
    inner = (mask & padded[:-2, 1:-1] & padded[2:, 1:-1]
             & padded[1:-1, :-2] & padded[1:-1, 2:])
    return inner if inner.any() else mask


def subject_fidelity(image, subject: Subject,
                     analysis: ImageAnalysis | None = None) -> SubjectFidelity:
    """Compare the image's object with the subject's true appearance (module doc)."""
    analysis = analysis or analyse(image)
    mask = analysis.object_mask
    if not mask.any():
        return SubjectFidelity(0.0, 0.0, 0.0, 0.0)
    named = analysis.colour_index == COLOUR_NAMES.index(subject.colour)  # (32, 32)
    inner = interior(mask)
    ious = {shape: fit_shape(mask, shape)[0] for shape in SHAPES}
    shape = float(ious[subject.shape] >= max(ious.values()))
    return SubjectFidelity(colour=float(named[mask].mean()), shape=shape,
                           pattern=pattern_score(mask, analysis.shade, subject.pattern),
                           interior_colour=float(named[inner].mean()),
                           interior_pattern=pattern_score(inner, analysis.shade,
                                                          subject.pattern),
                           shape_iou=ious[subject.shape])
