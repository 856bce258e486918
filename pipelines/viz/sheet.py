"""Contact sheet: many overlays at once, as a grid of thumbnails with a caption under each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from PIL import Image, ImageDraw

from pipelines.viz.overlay import font

SHEET_BACKGROUND = (245, 245, 245)
CAPTION_TEXT = (30, 30, 30)
CAPTION_MUTED = (110, 110, 110)
CELL_GAP_PX = 8
CAPTION_PX = 13  # caption font height; two lines under each thumbnail


@dataclasses.dataclass(frozen=True)
class Tile:
    """One cell of the sheet: an overlay and the two caption lines under it."""

    image: Image.Image
    title: str  # e.g. the file name
    subtitle: str  # e.g. "5 objects"


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> str:
    """``text`` cut at the front with "…" so it fits ``width`` pixels (file names differ at the end)."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength("…" + text, font=face) > width:
        text = text[1:]
    return "…" + text


def contact_sheet(tiles: Sequence[Tile], columns: int, cell_px: int = 256) -> Image.Image:
    """A grid of ``tiles``, ``columns`` wide, each thumbnail fitted (aspect kept) in ``cell_px`` square.

    Returns an RGB image of width ``columns * (cell_px + gap) + gap``.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    caption_h = 2 * CAPTION_PX + 8
    pitch_x, pitch_y = cell_px + CELL_GAP_PX, cell_px + caption_h + CELL_GAP_PX
    sheet = Image.new("RGB", (columns * pitch_x + CELL_GAP_PX, rows * pitch_y + CELL_GAP_PX), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    face = font(CAPTION_PX)
    for index, tile in enumerate(tiles):
        x0 = CELL_GAP_PX + (index % columns) * pitch_x
        y0 = CELL_GAP_PX + (index // columns) * pitch_y
        thumb = tile.image.copy()
        thumb.thumbnail((cell_px, cell_px), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x0 + (cell_px - thumb.width) // 2, y0 + (cell_px - thumb.height) // 2))
        draw.text((x0, y0 + cell_px + 3), _ellipsize(draw, tile.title, face, cell_px), font=face, fill=CAPTION_TEXT)
        draw.text((x0, y0 + cell_px + 5 + CAPTION_PX), tile.subtitle, font=face, fill=CAPTION_MUTED)
    return sheet
