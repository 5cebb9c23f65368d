"""Writes the tiny example dataset in examples/shapes: simple coloured shapes with captions.

uv run python examples/make_examples.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}


def main() -> None:
    out = Path(__file__).parent / "shapes"
    out.mkdir(exist_ok=True)
    i = 0
    for shape in ("circle", "square"):
        for color, rgb in COLORS.items():
            bg_name = "white" if i % 2 == 0 else "black"
            # Sizes differ so the original-size conditioning has something to say.
            w, h = (96, 80) if i % 3 else (80, 96)
            image = Image.new("RGB", (w, h), BACKGROUNDS[bg_name])
            draw = ImageDraw.Draw(image)
            box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
            image.save(out / f"{i:03d}.png")
            (out / f"{i:03d}.txt").write_text(f"a {color} {shape} on a {bg_name} background\n")
            i += 1


if __name__ == "__main__":
    main()
