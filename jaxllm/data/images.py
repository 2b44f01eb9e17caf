"""Synthetic image tasks: small rendered RGB pictures, a question each, a verifiable answer.

Pure numpy: shapes and digits are drawn on a black square of `image_size` pixels (default 24),
the digits from a built-in 3x5 bitmap font scaled by image_size // 8. Families, and the rate of
the best guess made without looking at the picture (chance):

  colour  one shape; "What colour is the shape?"            a colour word of `COLOURS`  1/6
  shape   one shape; "What shape is it?"                    square, circle, triangle    1/3
  count   1-4 shapes of one colour, none touching;
          "How many shapes?"                                1..4                        1/4
  digit   one digit; "What digit is shown?"                 0..9                        1/10
  sum     two digits side by side; "What is the sum of
          the two numbers in the picture?"                  0..18 (9 is the commonest)  1/10

A document follows the reasoning corpus (`jaxllm.data.tasks`), with the image marker `IMAGE`
where the picture goes; a source expands each marker into the image's span of patch tokens:

    "Q: <image>What is the sum of the two numbers in the picture?\n"
    "<think>4+7=11</think><answer>11</answer>"

Only `sum` writes a thought (its two digits, left first, and their sum); the other families
think nothing.
"""

import dataclasses

import numpy as np

IMAGE = "<image>"  # the marker of an image in a document's text
FAMILIES = ("colour", "shape", "count", "digit", "sum")
CHANCE = {"colour": 1 / 6, "shape": 1 / 3, "count": 1 / 4, "digit": 1 / 10, "sum": 1 / 10}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes?",
    "digit": "What digit is shown?",
    "sum": "What is the sum of the two numbers in the picture?",
}
COLOURS = {
    "red": (230, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (160, 60, 210), "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
FONT = {  # 3x5 glyphs, rows top to bottom
    0: ("111", "101", "101", "101", "111"), 1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"), 3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"), 5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"), 7: ("111", "001", "001", "001", "001"),
    8: ("111", "101", "111", "101", "111"), 9: ("111", "101", "111", "001", "111"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageProblem:
    """One picture (uint8 [image_size, image_size, 3]) with its question and answer."""

    family: str
    question: str
    answer: str
    thought: str
    image: np.ndarray


def prompt(problem: ImageProblem) -> str:
    """The text a model sees before it starts thinking, the image marker first."""
    return f"Q: {IMAGE}{problem.question}\n"


def document(problem: ImageProblem) -> str:
    """The full training text: prompt, thought and answer."""
    return f"{prompt(problem)}<think>{problem.thought}</think><answer>{problem.answer}</answer>"


def generate(family: str, rng: np.random.Generator, image_size: int = 24) -> ImageProblem:
    """One random problem of `family` with a picture of `image_size` pixels (at least 8)."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown image task family {family!r}; choose from {FAMILIES}")
    if image_size < 8:
        raise ValueError(f"image_size: must be >= 8 to draw a digit, got {image_size}")
    image = np.zeros((image_size, image_size, 3), np.uint8)
    answer, thought = _GENERATORS[family](rng, image)
    return ImageProblem(family, QUESTIONS[family], answer, thought, image)


def shape_mask(kind: str, size: int) -> np.ndarray:
    """A filled square, circle or upward triangle in a [size, size] boolean box."""
    centre = np.arange(size) + 0.5 - size / 2
    y, x = centre[:, None], centre[None, :]
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "circle":
        return y**2 + x**2 <= (size / 2) ** 2
    return np.abs(x) <= (y + size / 2) / 2  # the half-width grows to size/2 at the bottom


def glyph_mask(digit: int, scale: int) -> np.ndarray:
    """The digit's 3x5 glyph, each pixel a scale x scale block: [5 * scale, 3 * scale]."""
    bits = np.array([[c == "1" for c in row] for row in FONT[digit]])
    return np.kron(bits, np.ones((scale, scale), bool)).astype(bool)


def _paint(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator,
           colour: tuple[int, int, int]) -> bool:
    """Draws the masks at random places, each box at least a pixel clear of the others;
    False (and nothing drawn) when no such places were found."""
    boxes = []
    for mask in masks:
        h, w = mask.shape
        for _ in range(100):
            y = int(rng.integers(image.shape[0] - h + 1))
            x = int(rng.integers(image.shape[1] - w + 1))
            if all(y > b + bh or b > y + h or x > a + bw or a > x + w for b, a, bh, bw in boxes):
                boxes.append((y, x, h, w))
                break
        else:
            return False
    for mask, (y, x, h, w) in zip(masks, boxes):
        image[y:y + h, x:x + w][mask] = colour
    return True


def _colour(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return name, COLOURS[name]


def _one_shape(rng: np.random.Generator, image: np.ndarray) -> tuple[str, str]:
    """Draws one shape; returns (its colour, its kind)."""
    size = image.shape[0]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    name, colour = _colour(rng)
    _paint(image, [shape_mask(kind, int(rng.integers(size * 2 // 5, size * 3 // 4 + 1)))],
           rng, colour)
    return name, kind


def _make_colour(rng, image):
    return _one_shape(rng, image)[0], ""


def _make_shape(rng, image):
    return _one_shape(rng, image)[1], ""


def _make_count(rng, image):
    count = int(rng.integers(1, 5))
    low, high = max(2, image.shape[0] // 6), max(2, image.shape[0] // 4)
    colour = _colour(rng)[1]
    while True:
        kinds = [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=count)]
        masks = [shape_mask(kind, int(rng.integers(low, high + 1))) for kind in kinds]
        if _paint(image, masks, rng, colour):
            return str(count), ""


def _make_digit(rng, image):
    digit = int(rng.integers(10))
    _paint(image, [glyph_mask(digit, image.shape[0] // 8)], rng, _colour(rng)[1])
    return str(digit), ""


def _make_sum(rng, image):
    """Two digits, the first left of the middle and the second right of it, two columns
    apart at least."""
    a, b = (int(d) for d in rng.integers(10, size=2))
    colour, size = _colour(rng)[1], image.shape[0]
    for digit, half in ((a, image[:, :size // 2 - 1]), (b, image[:, size // 2 + 1:])):
        _paint(half, [glyph_mask(digit, size // 8)], rng, colour)
    return str(a + b), f"{a}+{b}={a + b}"


_GENERATORS = {
    "colour": _make_colour,
    "shape": _make_shape,
    "count": _make_count,
    "digit": _make_digit,
    "sum": _make_sum,
}
