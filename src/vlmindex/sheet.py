"""Contact sheets: a grid of captioned tiles, so a person can look at what a stage did."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels, so captions never overlap."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    tiles: Sequence[tuple[Image.Image, str]], *, columns: int = 8, tile_size: int = 160
) -> Image.Image:
    """Lay ``(image, caption)`` tiles out in a grid, each image fitted into ``tile_size`` pixels."""
    columns = max(1, min(columns, len(tiles) or 1))
    rows = (len(tiles) + columns - 1) // columns
    caption_h = max(12, tile_size // 9)
    font = ImageFont.load_default(size=caption_h - 2)
    sheet = Image.new("RGB", (columns * tile_size, rows * (tile_size + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        x, y = (i % columns) * tile_size, (i // columns) * (tile_size + caption_h)
        thumb = img.convert("RGB").copy()
        thumb.thumbnail((tile_size - 4, tile_size - 4))
        sheet.paste(thumb, (x + (tile_size - thumb.width) // 2, y + (tile_size - thumb.height) // 2))
        draw.text((x + 2, y + tile_size), _fit(caption, font, tile_size - 4), fill=(0, 0, 0), font=font)
    return sheet
