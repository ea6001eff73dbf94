"""A procedurally drawn world of flat shapes on flat backgrounds, with captions."""

from __future__ import annotations

import numpy as np


SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 40),
    "cyan": (40, 215, 225),
    "magenta": (225, 45, 205),
    "orange": (245, 140, 20),
    "purple": (110, 40, 150),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7.0, "large": 13.0}  # half-extent in pixels
POSITIONS = {  # centre (x, y) in pixels
    "left": (18, 32),
    "right": (46, 32),
    "top": (32, 18),
    "bottom": (32, 46),
    "center": (32, 32),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | {"a", "on", "the", "at", "in", "background", ","}
)


def caption(attrs: dict) -> str:
    """Caption from attributes; keys missing or None are left out."""
    words = ["a"]
    if attrs.get("size"):
        words.append(attrs["size"])
    if attrs.get("color"):
        words.append(attrs["color"])
    words.append(attrs["shape"])
    text = " ".join(words)
    if attrs.get("position"):
        text += " " + POSITION_PHRASES[attrs["position"]]
    if attrs.get("background"):
        text += f", {attrs['background']} background"
    return text


def sample_attrs(rng: np.random.Generator) -> dict:
    """Draw one scene's attributes (all of them, none missing)."""
    colors = list(COLORS)
    color = colors[rng.integers(len(colors))]
    background = color
    while background == color:
        background = colors[rng.integers(len(colors))]
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": color,
        "background": background,
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
    }


def render(attrs: dict, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a scene: (64, 64, 3) uint8. rng adds a little jitter to size and place."""
    jx, jy, js = rng.uniform(-2, 2, 3) if rng is not None else (0.0, 0.0, 0.0)
    cx, cy = POSITIONS[attrs["position"]]
    cx, cy, r = cx + jx, cy + jy, SIZES[attrs["size"]] + 0.5 * js
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if attrs["shape"] == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif attrs["shape"] == "square":
        s = r * 0.9
        mask = (np.abs(xx - cx) <= s) & (np.abs(yy - cy) <= s)
    else:  # upright triangle inside the box [cx-r, cx+r] x [cy-r, cy+r]
        t = (yy - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        mask = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = COLORS[attrs["background"]]
    img[mask] = COLORS[attrs["color"]]
    return img


def sample(rng: np.random.Generator, drop: float = 0.0) -> tuple[np.ndarray, str, dict]:
    """One (image, caption, attributes); `drop` is the chance each optional word is left out."""
    attrs = sample_attrs(rng)
    img = render(attrs, rng)
    said = dict(attrs)
    for key in ("color", "background", "size", "position"):
        if drop and rng.random() < drop:
            said[key] = None
    return img, caption(said), attrs


def render_batch(attrs: list[dict], rng: np.random.Generator | None = None) -> np.ndarray:
    """Vectorised render of many scenes: (n, 64, 64, 3) uint8 (same drawing as render)."""
    n = len(attrs)
    jit = rng.uniform(-2, 2, (n, 3)).astype(np.float32) if rng is not None else np.zeros((n, 3), np.float32)
    pos = np.array([POSITIONS[a["position"]] for a in attrs], np.float32)
    cx, cy = (pos[:, 0] + jit[:, 0])[:, None, None], (pos[:, 1] + jit[:, 1])[:, None, None]
    r = (np.array([SIZES[a["size"]] for a in attrs], np.float32) + 0.5 * jit[:, 2])[:, None, None]
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5)[:, None]
    dx, dy = xx - cx, yy - cy  # (n, 64, 64)
    circle = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    t = (dy + r) / (2 * r)
    triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    kind = np.array([SHAPES.index(a["shape"]) for a in attrs])[:, None, None]
    mask = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))[..., None]
    fg = np.array([COLORS[a["color"]] for a in attrs], np.uint8)[:, None, None]
    bg = np.array([COLORS[a["background"]] for a in attrs], np.uint8)[:, None, None]
    return np.where(mask, fg, bg)


def batch(rng: np.random.Generator, n: int, drop: float = 0.0):
    """n fresh samples: images (n, 64, 64, 3) uint8, captions, attribute dicts."""
    attrs = [sample_attrs(rng) for _ in range(n)]
    caps = []
    for a in attrs:
        said = dict(a)
        for key in ("color", "background", "size", "position"):
            if drop and rng.random() < drop:
                said[key] = None
        caps.append(caption(said))
    return render_batch(attrs, rng), caps, attrs


def eval_set(n: int = 200, seed: int = 1234) -> list[tuple[str, int, dict]]:
    """A fixed list of (full caption, seed, attributes) for evaluation."""
    rng = np.random.default_rng(seed)
    return [(caption(a), 1000 + i, a) for i, a in ((i, sample_attrs(rng)) for i in range(n))]
