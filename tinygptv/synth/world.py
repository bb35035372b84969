"""The synthetic visual world: a small vocabulary, :class:`Scene` descriptions, scene sampling, spatial
relations and unique referring expressions.

A scene is 1–4 non-overlapping shapes (shape × colour × size, pixel box ``[x, y, w, h]``) on a light
background, plus optionally one short rendered word. Everything said about a scene (captions, answers, boxes)
is derived from this description, so it is correct by construction. Sampling draws only from the
:class:`random.Random` it is given, so a seed fixes every scene.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from tinygptv.synth.font import word_ink_size

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "diamond": "diamonds", "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "orange": (245, 135, 30), "purple": (140, 60, 180), "pink": (240, 120, 190), "brown": (130, 85, 40),
}
SIZES: tuple[str, ...] = ("small", "large")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "hat", "cup", "key", "pen", "bus", "fox", "map", "owl",
                          "bird", "fish", "tree", "moon")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASES: dict[str, str] = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                                    "below": "below"}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                                    "bottom": "at the bottom"}
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.14, 0.18), "large": (0.26, 0.32)}  # × min(W, H)
N_OBJECT_WEIGHTS: tuple[float, ...] = (0.2, 0.3, 0.3, 0.2)  # P(1..4 objects)
GAP = 4  # minimal free pixels between two things in a scene
WORD_INK = (25, 25, 25)
LEGIBLE_INPUT = 64  # words are zoomed so each font pixel is still >= 1 pixel at this model input size

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Obj:
    """One shape; ``box`` is the tight pixel box ``[x, y, w, h]`` of its drawing."""

    shape: str
    colour: str
    size: str
    box: Box

    @property
    def x2(self) -> int:
        return self.box[0] + self.box[2]

    @property
    def y2(self) -> int:
        return self.box[1] + self.box[3]

    @property
    def centre(self) -> tuple[float, float]:
        return self.box[0] + self.box[2] / 2, self.box[1] + self.box[3] / 2

    def name(self, size: bool = True, colour: bool = True) -> str:
        """``"large red circle"`` (parts optional)."""
        return " ".join([*([self.size] if size else []), *([self.colour] if colour else []), self.shape])


@dataclass(frozen=True)
class Word:
    """A rendered word; ``box`` bounds its ink (``[x, y, w, h]``); ``scale`` is the bitmap-font zoom."""

    text: str
    box: Box
    scale: int


@dataclass(frozen=True)
class Scene:
    """A JSON-able scene description (see :meth:`to_dict`); ``noise_seed`` fixes the background grain."""

    id: str
    width: int
    height: int
    background: tuple[int, int, int]
    noise: float
    noise_seed: int
    objects: tuple[Obj, ...]
    word: Word | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["background"] = list(self.background)
        d["objects"] = [{**asdict(o), "box": list(o.box)} for o in self.objects]
        if self.word is not None:
            d["word"] = {**asdict(self.word), "box": list(self.word.box)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        word = d.get("word")
        return cls(id=d["id"], width=d["width"], height=d["height"], background=tuple(d["background"]),
                   noise=d["noise"], noise_seed=d["noise_seed"],
                   objects=tuple(Obj(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in d["objects"]),
                   word=Word(word["text"], tuple(word["box"]), word["scale"]) if word else None)

    def signature(self) -> str:
        """Everything that determines the picture except the id: equal signatures = the same scene."""
        objs = sorted(f"{o.shape}/{o.colour}/{o.size}@{','.join(map(str, o.box))}" for o in self.objects)
        word = f"{self.word.text}@{','.join(map(str, self.word.box))}" if self.word else "-"
        return f"{self.width}x{self.height}|{self.background}|{self.noise:.3f}|{'|'.join(objs)}|{word}"

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects if shape in (None, o.shape) and colour in (None, o.colour))


# ------------------------------------------------------------------------------------------ geometry
def shape_polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    """Polygon of ``shape`` in the square ``(x, y, s, s)`` (circles: a fine polygon, for the tight box)."""
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 48), cy + r * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if shape == "triangle":
        return [(cx, y), (x + s, y + s), (x, y + s)]
    if shape == "diamond":
        return [(cx, y), (x + s, cy), (cx, y + s), (x, cy)]
    if shape == "cross":
        t = s / 3
        return [(x + t, y), (x + 2 * t, y), (x + 2 * t, y + t), (x + s, y + t), (x + s, y + 2 * t),
                (x + 2 * t, y + 2 * t), (x + 2 * t, y + s), (x + t, y + s), (x + t, y + 2 * t), (x, y + 2 * t),
                (x, y + t), (x + t, y + t)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(ang), cy + r * 0.1 + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def polygon_box(points: list[tuple[float, float]]) -> Box:
    """Integer ``[x, y, w, h]`` enclosing the polygon (floor/ceil)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x1, y1 = math.floor(min(xs)), math.floor(min(ys))
    return x1, y1, math.ceil(max(xs)) - x1, math.ceil(max(ys)) - y1


def boxes_apart(a: Box, b: Box, gap: int = GAP) -> bool:
    """True when the two boxes are separated by at least ``gap`` pixels on some axis."""
    return (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0] or a[1] + a[3] + gap <= b[1]
            or b[1] + b[3] + gap <= a[1])


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    """Strict spatial relations between boxes: ``a`` entirely left of / right of / above / below ``b``."""
    if relation == "left of":
        return a.x2 <= b.box[0]
    if relation == "right of":
        return b.x2 <= a.box[0]
    if relation == "above":
        return a.y2 <= b.box[1]
    if relation == "below":
        return b.y2 <= a.box[1]
    raise ValueError(f"unknown relation {relation!r}; valid: {RELATIONS}")


def relations(scene: Scene) -> list[tuple[int, str, int]]:
    """Every true ``(i, relation, j)`` of the scene's objects."""
    objs = scene.objects
    return [(i, rel, j) for i in range(len(objs)) for j in range(len(objs)) if i != j for rel in RELATIONS
            if relation_holds(objs[i], objs[j], rel)]


def region(scene: Scene, box: Box) -> str:
    """Position of a box's centre on a 3 × 3 grid: ``"top left"``, ``"top"``, …, ``"center"``, …"""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    col = ("left", "", "right")[min(2, int(3 * cx / scene.width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / scene.height))]
    return " ".join(p for p in (row, col) if p) or "center"


# ------------------------------------------------------------------------------------------ sampling
def sample_scene(rng: random.Random, scene_id: str, image_size: int = 128, n_objects: int | None = None,
                 word: bool | None = None, word_prob: float = 0.3) -> Scene:
    """A random scene; ``n_objects``/``word`` force the object count / the presence of a word.

    Image width and height are drawn independently in ``[0.875, 1.25] × image_size``. Objects never overlap
    and no two share shape, colour and size; a word that does not fit is retried a few times, then dropped
    (unless ``word=True``, which resamples the layout).
    """
    for _ in range(100):
        scene = _try_scene(rng, scene_id, image_size, n_objects, word, word_prob)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not lay out scene {scene_id} at image size {image_size}")


def _try_scene(rng: random.Random, scene_id: str, image_size: int, n_objects: int | None, word: bool | None,
               word_prob: float) -> Scene | None:
    lo, hi = round(image_size * 0.875), round(image_size * 1.25)
    width, height = rng.randint(lo, hi), rng.randint(lo, hi)
    background = (rng.randint(232, 252), rng.randint(232, 252), rng.randint(232, 252))
    noise = rng.choice((0.0, 0.0, rng.uniform(2.0, 6.0)))
    n = n_objects if n_objects is not None else rng.choices(range(1, 5), weights=N_OBJECT_WEIGHTS)[0]
    objs: list[Obj] = []
    side = min(width, height)
    while len(objs) < n:
        kind = (rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES))
        if any((o.shape, o.colour, o.size) == kind for o in objs):
            continue
        placed = _place_object(rng, kind, side, width, height, [o.box for o in objs])
        if placed is None:
            return None
        objs.append(placed)
    want_word = word if word is not None else rng.random() < word_prob
    placed_word = _place_word(rng, width, height, [o.box for o in objs]) if want_word else None
    if word and placed_word is None:
        return None
    return Scene(scene_id, width, height, background, round(noise, 3), rng.randrange(2**31), tuple(objs),
                 placed_word)


def _place_word(rng: random.Random, width: int, height: int, taken: list[Box]) -> Word | None:
    """A random word at a free place, zoomed so it stays legible at a 64 px input; ``None`` if it does not fit."""
    text = rng.choice(WORDS)
    scale = max(2, math.ceil(max(width, height) / LEGIBLE_INPUT))
    ww, wh = word_ink_size(text, scale)
    if ww + 6 > width or wh + 6 > height:
        return None
    for _ in range(30):
        box = (rng.randint(3, width - ww - 3), rng.randint(3, height - wh - 3), ww, wh)
        if all(boxes_apart(box, t) for t in taken):
            return Word(text, box, scale)
    return None


def _place_object(rng: random.Random, kind: tuple[str, str, str], side: int, width: int, height: int,
                  taken: list[Box]) -> Obj | None:
    shape, colour, size = kind
    lo, hi = SIZE_RANGES[size]
    for _ in range(40):
        s = rng.uniform(lo, hi) * side
        x, y = rng.uniform(3, width - s - 3), rng.uniform(3, height - s - 3)
        box = polygon_box(shape_polygon(shape, x, y, s))
        if all(boxes_apart(box, t) for t in taken):
            return Obj(shape, colour, size, box)
    return None


# ------------------------------------------------------------------------------------------ referring expressions
@dataclass(frozen=True)
class RefSpec:
    """A referring expression as a query: attribute filters, an optional extreme position among the matches
    (``left``/``right``/``top``/``bottom``) and an optional relation to an anchor expression."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    relation: tuple[str, RefSpec] | None = None

    @property
    def kind(self) -> str:
        """``relation`` > ``spatial`` (position) > ``attribute``."""
        return "relation" if self.relation else "spatial" if self.position else "attribute"

    def text(self, article: str = "the") -> str:
        """``"the small red circle on the left"``, ``"the star to the left of the blue square"`` …"""
        words = [*([article] if article else []), *(w for w in (self.size, self.colour) if w), self.shape or "object"]
        if self.position:
            words.append(POSITION_PHRASES[self.position])
        if self.relation:
            words += [RELATION_PHRASES[self.relation[0]], self.relation[1].text()]
        return " ".join(words)


def resolve(scene: Scene, spec: RefSpec) -> list[int]:
    """Indices of the objects ``spec`` denotes (a unique expression gives exactly one)."""
    objs = scene.objects
    cand = [i for i, o in enumerate(objs) if spec.shape in (None, o.shape) and spec.colour in (None, o.colour)
            and spec.size in (None, o.size)]
    if spec.relation:
        rel, anchor_spec = spec.relation
        anchor = resolve(scene, anchor_spec)
        if len(anchor) != 1:
            return []
        cand = [i for i in cand if i != anchor[0] and relation_holds(objs[i], objs[anchor[0]], rel)]
    if spec.position:
        if len(cand) < 2:
            return []
        rel = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[spec.position]
        winners = [i for i in cand if all(relation_holds(objs[i], objs[j], rel) for j in cand if j != i)]
        return winners if len(winners) == 1 else []
    return cand


def referring_expressions(scene: Scene, index: int, kinds: tuple[str, ...] = ("attribute", "spatial", "relation")
                          ) -> list[RefSpec]:
    """Every unique expression of object ``index`` among a fixed family, shortest first."""
    o = scene.objects[index]
    attrs = [RefSpec(shape=o.shape), RefSpec(colour=o.colour), RefSpec(shape=o.shape, colour=o.colour),
             RefSpec(shape=o.shape, size=o.size), RefSpec(colour=o.colour, size=o.size),
             RefSpec(shape=o.shape, colour=o.colour, size=o.size)]
    out = [s for s in attrs if "attribute" in kinds]
    if "spatial" in kinds:
        out += [replace(base, position=p) for base in (RefSpec(), RefSpec(shape=o.shape), RefSpec(colour=o.colour))
                for p in POSITIONS]
    if "relation" in kinds:
        for j in range(len(scene.objects)):
            anchors = unique_attribute_specs(scene, j) if j != index else []
            for rel in RELATIONS:
                if anchors and relation_holds(o, scene.objects[j], rel):
                    out += [RefSpec(shape=o.shape, relation=(rel, anchors[0])),
                            RefSpec(shape=o.shape, colour=o.colour, relation=(rel, anchors[0]))]
    return [s for s in dict.fromkeys(out) if resolve(scene, s) == [index]]


def full_name(scene: Scene, index: int) -> RefSpec:
    """Object ``index``'s size, colour and shape: unique in every scene of the world (it never holds two alike)."""
    o = scene.objects[index]
    return RefSpec(shape=o.shape, colour=o.colour, size=o.size)


def unique_attribute_specs(scene: Scene, index: int) -> list[RefSpec]:
    """The unique attribute-only expressions of an object (always at least the full size-colour-shape one)."""
    return referring_expressions(scene, index, ("attribute",))


def ref_texts(scene: Scene, index: int, kinds: tuple[str, ...] = ("attribute", "spatial"),
              article: str = "the") -> list[str]:
    """The texts of :func:`referring_expressions` (``article=""`` gives Visual-Genome-style phrases)."""
    return [spec.text(article) for spec in referring_expressions(scene, index, kinds)]
