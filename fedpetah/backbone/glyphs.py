"""Letters and symbols (no digits, no digit look-alikes) rendered from the fonts bundled with matplotlib."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# Upper- and lower-case Latin without the shapes a digit could pass for (O o 0, I l 1, Z z 2, S s 5, G b 6,
# B 8, g q 9) and without the pairs that one rotation turns into each other (d = p, u = n, W = M, w = m).
LATIN = "ACDEFHJKLMNPQRTUVXYacefhijkmnprtvxy"
# Greek letters that differ from every Latin one; Lambda (a turned V) and nabla (a turned Delta) left out.
GREEK = "ΓΔΘΞΠΣΦΨΩαβγδεζηθλμξπρστφχψω"
# Signs, one of each rotation family (one arrow, one of < >, one of the subset signs ...); no circle (0).
SYMBOLS = "+×÷=≠≈<≤∞∫∑∏√∂∈∩⊂∃¬±#$%&@?!§¶€£¥★♠♣♥♦→⇒♪✓∠△□◇⊕⊗"
GLYPHS = LATIN + GREEK + SYMBOLS
"""Every glyph class, in label order: no digit and no shape that one rotation makes into another class."""

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
"""matplotlib's bundled fonts (always installed with it, so every machine renders the same set)."""


def font_dir() -> Path:
    """Where matplotlib keeps its bundled TrueType fonts."""
    import matplotlib  # imported on use: only the server renders glyphs

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _charmap(path: Path) -> set[int]:
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(str(path)).get_charmap())


@lru_cache(maxsize=32)
def _font(path: str, em: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(path, em)


def render(char: str, path: Path, size: int, fill: float = 0.72) -> np.ndarray:
    """One glyph, white on black, its larger side ``fill`` of a ``size`` x ``size`` uint8 canvas, centred."""
    from PIL import Image, ImageDraw  # Pillow comes with matplotlib

    em = 2 * size
    font = _font(str(path), em)
    canvas = Image.new("L", (2 * em, 2 * em), 0)
    ImageDraw.Draw(canvas).text((em // 2, em // 2), char, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"{path.name} renders {char!r} as an empty image")
    glyph = canvas.crop(box)
    scale = fill * size / max(glyph.size)
    width, height = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - width) // 2, (size - height) // 2))
    return np.asarray(out, dtype=np.uint8)


@lru_cache(maxsize=2)
def glyph_images(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (font, glyph) pair the fonts cover: uint8 images (N, 1, size, size), glyph labels, font indices.

    Deterministic for a given matplotlib and Pillow (their versions enter the warm-up's cache key).
    """
    images, labels, fonts = [], [], []
    for f, name in enumerate(FONT_FILES):
        path = font_dir() / name
        if not path.is_file():
            continue
        covered = _charmap(path)
        for label, char in enumerate(GLYPHS):
            if ord(char) in covered:
                images.append(render(char, path, size))
                labels.append(label)
                fonts.append(f)
    if len(set(labels)) != len(GLYPHS):
        missing = sorted(set(GLYPHS) - {GLYPHS[i] for i in labels})
        raise RuntimeError(f"matplotlib's fonts in {font_dir()} lack glyphs {missing}")
    out = np.stack(images)[:, None], np.asarray(labels, dtype=np.int64), np.asarray(fonts, dtype=np.int64)
    for array in out:
        array.flags.writeable = False
    return out


def renderer_versions() -> dict[str, str]:
    """Versions that determine the rendered pixels (for cache keys)."""
    import matplotlib
    import PIL

    return {"matplotlib": matplotlib.__version__, "pillow": PIL.__version__}
