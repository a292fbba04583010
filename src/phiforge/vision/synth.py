"""A synthetic visual-instruction dataset in LLaVA format, drawn offline with PIL.

Each image (64x64 by default) shows 1-3 copies of one shape in one colour on a light grey background, every
copy wholly in the left or the right half. Its conversation asks, in a random order, four questions with
one-word answers:
    color    "What color are the shapes?"                       red | green | blue | yellow | purple | orange
    shape    "Which shape is drawn?"                            circle | square | triangle | diamond
    count    "How many shapes are there?"                       one | two | three
    position "Are the shapes on the left, the right or both?"   left | right | both
The questions never depend on the image, so only the image can tell the answers apart. Each human turn carries
a `kind` (used by `phiforge vision eval`). Everything follows from --seed.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

from phiforge.errors import DataError
from phiforge.fileio import output_dir
from phiforge.vision.encoders import require

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 230), "yellow": (235, 200, 20),
          "purple": (150, 60, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNTS = ("one", "two", "three")
QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "Which shape is drawn?",
    "count": "How many shapes are there?",
    "position": "Are the shapes on the left, the right or both?",
}


def _place(rng: random.Random, n: int, size: int) -> tuple[int, list[tuple[float, float, str]]]:
    """Radius and n non-overlapping centres, each shape wholly inside its half of the image."""
    half = size / 2
    while True:  # rejection sampling; a handful of tries at most
        r = rng.uniform(size * 0.12, size * 0.17)
        placed: list[tuple[float, float, str]] = []
        for _ in range(50 * n):
            side = rng.choice(("left", "right"))
            lo = r + 1 if side == "left" else half + r + 1
            x, y = rng.uniform(lo, lo + half - 2 * r - 2), rng.uniform(r + 1, size - r - 1)
            if all(math.hypot(x - px, y - py) > 2 * r + 2 for px, py, _ in placed):
                placed.append((x, y, side))
                if len(placed) == n:
                    return round(r), placed


def _draw(draw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # about the circle's area
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r * 1.1), (x + r * 1.1, y), (x, y + r * 1.1), (x - r * 1.1, y)], fill=fill)


def make_example(rng: random.Random, size: int):
    """(PIL image, facts, conversation) for one random scene."""
    Image, ImageDraw = require("PIL.Image"), require("PIL.ImageDraw")
    color, shape, n = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 3)
    grey = rng.randint(215, 250)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    r, centres = _place(rng, n, size)
    for x, y, _ in centres:
        _draw(draw, shape, x, y, r, COLORS[color])
    sides = {side for _, _, side in centres}
    facts = {"color": color, "shape": shape, "count": COUNTS[n - 1],
             "position": sides.pop() if len(sides) == 1 else "both"}
    kinds = list(QUESTIONS)
    rng.shuffle(kinds)
    turns = []
    for j, kind in enumerate(kinds):
        question = ("<image>\n" if j == 0 else "") + QUESTIONS[kind]
        turns += [{"from": "human", "value": question, "kind": kind}, {"from": "gpt", "value": facts[kind]}]
    return img, facts, turns


MAX_IMAGES = 1_000_000
MAX_SIZE = 4096  # pixels per side: the encoders resize to a few hundred; larger only fills the disk


def synthesize(out: Path, n: int, seed: int = 0, heldout: float = 0.1, size: int = 64,
               overwrite: bool = False) -> dict:
    """Write OUT/images/*.png, OUT/train.json, OUT/heldout.json and OUT/info.json; returns the info.
    OUT must be new, empty or an earlier synth output (else `overwrite`); it is replaced whole at the end."""
    if n < 2:
        raise DataError("--n must be at least 2 (one training and one held-out image)")
    if n > MAX_IMAGES:
        raise DataError(f"--n must be at most {MAX_IMAGES:,} (images are numbered with 6 digits), got {n}")
    if not 0.0 < heldout < 1.0:
        raise DataError(f"--heldout must be a fraction between 0 and 1, got {heldout}")
    if not 32 <= size <= MAX_SIZE:
        raise DataError(f"--size must be from 32 to {MAX_SIZE} pixels, got {size}")
    require("PIL.Image")  # before anything is written
    with output_dir(out, "vision-synth", overwrite=overwrite) as tmp:
        return _write(tmp, n, seed, heldout, size)


def _write(out: Path, n: int, seed: int, heldout: float, size: int) -> dict:
    (out / "images").mkdir()
    rng = random.Random(seed)
    n_heldout = max(1, round(n * heldout))
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for i in range(n):
        img, facts, turns = make_example(rng, size)
        name = f"images/{i:06d}.png"
        img.save(out / name)
        split = "heldout" if i >= n - n_heldout else "train"
        splits[split].append({"id": f"synth-{i:06d}", "image": name, "conversations": turns, "facts": facts})
    for split, records in splits.items():
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    info = {"seed": seed, "size": size, "train": len(splits["train"]), "heldout": len(splits["heldout"]),
            "answers": {k: dict(sorted(Counter(r["facts"][k] for r in splits["heldout"]).items())) for k in QUESTIONS}}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
