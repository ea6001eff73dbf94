"""Markdown tables and a small bar chart (PIL only)."""

from __future__ import annotations

from pathlib import Path


COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, title: str, rows: list[tuple[str, list[tuple[str, float]]]], stacked: bool = True) -> None:
    """Horizontal bars in ms, one per row; stacked segments (stages) or side-by-side values."""
    from PIL import Image, ImageDraw

    label_w, bar_w, bar_h, pad = 330, 520, 18, 6
    per_row = 1 if stacked else max(len(parts) for _, parts in rows)
    height = 40 + len(rows) * (per_row * bar_h + 2 * pad) + 30
    image = Image.new("RGB", (label_w + bar_w + 120, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title[:150], fill="black")
    longest = max((sum(v for _, v in parts) if stacked else max(v for _, v in parts)) for _, parts in rows) or 1
    y, names = 36, []
    for label, parts in rows:
        draw.text((8, y + pad), label[:52], fill="black")
        x = label_w
        for i, (name, value) in enumerate(parts):
            if name not in names:
                names.append(name)
            width = max(1, int(value / longest * bar_w))
            top = y + pad + (0 if stacked else i * bar_h)
            draw.rectangle([x, top, x + width, top + bar_h - 2], fill=COLOURS[names.index(name) % len(COLOURS)])
            if stacked:
                x += width
            else:
                draw.text((x + width + 4, top + 2), f"{value:.0f} ms", fill="black")
        if stacked:
            draw.text((x + 4, y + pad + 2), f"{sum(v for _, v in parts):.0f} ms", fill="black")
        y += per_row * bar_h + 2 * pad
    for i, name in enumerate(names):  # legend
        draw.rectangle([label_w + i * 90, y + 8, label_w + i * 90 + 10, y + 18], fill=COLOURS[i % len(COLOURS)])
        draw.text((label_w + i * 90 + 14, y + 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
