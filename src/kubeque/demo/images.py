"""Source images for the thumbnail tasks: generated with Pillow, or taken from the user's folder."""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
PALETTE = [
    "#264653",
    "#2a9d8f",
    "#e9c46a",
    "#f4a261",
    "#e76f51",
    "#6d597a",
    "#b56576",
    "#355070",
    "#eaac8b",
    "#90be6d",
    "#577590",
    "#f94144",
]


def generate_sources(folder: Path, count: int = 36, size: int = 256, seed: int = 7) -> list[Path]:
    """Draw ``count`` distinct images (gradient, shapes, a label) into ``folder``; return their paths."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    font = ImageFont.load_default(size=size // 6)
    paths = []
    for i in range(count):
        dark, light = rng.sample(PALETTE, 2)
        gradient = Image.linear_gradient("L").resize((size, size)).rotate(rng.choice([0, 45, 90, 135, 180]))
        image = ImageOps.colorize(gradient, black=dark, white=light)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(3, 7)):
            x0, y0 = rng.randrange(size * 3 // 4), rng.randrange(size * 3 // 4)
            x1, y1 = x0 + rng.randint(20, size // 2), y0 + rng.randint(20, size // 2)
            colour = rng.choice(PALETTE)
            shape = rng.choice(["ellipse", "rectangle", "triangle"])
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour, outline="white", width=2)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        label = f"#{i + 1:02d}"
        draw.text((size // 12, size - size // 4), label, fill="white", font=font, stroke_width=2, stroke_fill="black")
        # Both common formats, so the thumbnailer decodes JPEG and PNG alike.
        path = folder / (f"source-{i + 1:02d}.jpg" if i % 2 == 0 else f"source-{i + 1:02d}.png")
        if path.suffix == ".jpg":
            image.save(path, "JPEG", quality=85)
        else:
            image.save(path, "PNG")
        paths.append(path)
    return paths


def find_sources(folder: Path, limit: int = 500) -> list[Path]:
    """Readable images in the user's ``folder`` (recursively, at most ``limit``)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder; give a folder of image files")
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            continue  # an unreadable file would only fail its tasks; leave it out
        found.append(path.resolve())
        if len(found) >= limit:
            break
    if not found:
        raise ConfigError(
            f"--images {folder}: no readable image files ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "give a folder with some, or leave --images out to use generated ones"
        )
    return found


def write_corrupt_source(folder: Path) -> Path:
    """A file named like a photo that is not one: the poison task's input."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corrupt-upload.jpg"
    path.write_bytes(b"\xff\xd8 this upload was cut short and is not a JPEG at all\n")
    return path
