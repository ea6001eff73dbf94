"""Draw the example images in assets/examples/ (simple shapes, like the embedded model's world)."""

from pathlib import Path

from PIL import Image, ImageDraw


OUT = Path(__file__).resolve().parent.parent / "assets" / "examples"
SCENES = {
    "red-circle-on-blue.png": ((40, 70, 200), "ellipse", (220, 40, 40), (56, 56, 200, 200)),
    "yellow-triangle-on-purple.png": ((110, 40, 150), "polygon", (240, 210, 40), [(128, 40), (220, 210), (36, 210)]),
    "green-square-on-orange.png": ((240, 140, 40), "rectangle", (40, 170, 70), (70, 70, 186, 186)),
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (background, shape, color, where) in SCENES.items():
        image = Image.new("RGB", (256, 256), background)
        getattr(ImageDraw.Draw(image), shape)(where, fill=color)
        image.save(OUT / name, optimize=True)
        print(OUT / name)
