"""Score an image against the attributes its prompt asked for (palette snapping + region statistics)."""

from __future__ import annotations

import numpy as np

from .world import COLORS, POSITIONS


ATTRIBUTES = ("color", "background", "shape", "size", "position")
_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], np.float32)  # (10, 3)


def read(image) -> dict:
    """What the image shows: {color, background, shape, size, position} (None where nothing is seen)."""
    img = np.asarray(image, np.float32)[..., :3]  # (H, W, 3)
    h, w = img.shape[:2]
    labels = ((img[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W) nearest palette colour
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    inner = labels[labels != bg]
    seen = {"background": _NAMES[bg], "color": None, "shape": None, "size": None, "position": None}
    if inner.size < 0.01 * h * w:
        return seen
    fg = int(np.bincount(inner, minlength=len(_NAMES)).argmax())
    seen["color"] = _NAMES[fg]
    mask = largest_component(labels == fg)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) < 2 or len(cols) < 2:
        return seen
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    ys, xs = np.nonzero(box)
    ys, xs = ys + y0, xs + x0
    bh, bw = (y1 - y0 + 1) * 64 / h, (x1 - x0 + 1) * 64 / w  # box in 64x64 pixels
    half = len(box) // 2
    taper = box[:half].sum() / max(1, box[len(box) - half :].sum())  # ~1/3 for an upright triangle
    ch, cw = max(1, round(0.25 * box.shape[0])), max(1, round(0.25 * box.shape[1]))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    seen["shape"] = "triangle" if taper < 0.6 else "square" if corners > 0.6 else "circle"
    seen["size"] = "large" if max(bh, bw) > 19 else "small"
    cx, cy = (xs.mean() + 0.5) * 64 / w, (ys.mean() + 0.5) * 64 / h
    if seen["shape"] == "triangle":
        cy -= bh / 6  # a triangle's centroid sits 1/6 of its height below the box centre
    seen["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return seen


def flood(seed: np.ndarray, within: np.ndarray) -> np.ndarray:
    """The pixels of `within` 4-connected to `seed` (both (H, W) bool), by repeated dilation."""
    region = seed & within
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= within
        if (grown == region).all():
            return region
        region = grown


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask."""
    best, rest = np.zeros_like(mask), mask.copy()
    for _ in range(4):  # a few seeds are enough: speckles are small
        if rest.sum() <= best.sum():
            break
        ys, xs = np.nonzero(rest)
        seed = np.zeros_like(mask)
        seed[ys[len(ys) // 2], xs[len(xs) // 2]] = True
        comp = flood(seed, mask)
        if comp.sum() > best.sum():
            best = comp
        rest &= ~comp
    return best


def score(image, attrs: dict) -> dict:
    """Per asked attribute: True if the image shows it; plus 'all'."""
    seen = read(image)
    res = {k: seen[k] == attrs[k] for k in ATTRIBUTES if attrs.get(k)}
    res["all"] = all(res.values())
    return res


def rates(scores: list[dict]) -> dict:
    """Mean of each score key over many images."""
    keys = sorted({k for s in scores for k in s})
    return {k: float(np.mean([s[k] for s in scores if k in s])) for k in keys}
