"""Render resources/icons/frankenmoe.svg into the PNG sizes desktops ask for, and a Windows .ico.

Run after editing the SVG and commit the results, so that builds need neither this script nor QtSvg:
    python packaging/make_icons.py
The macOS .icns is made from these PNGs by packaging/macos/build.sh with the system's iconutil.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PySide6.QtGui import QImage

ICONS = Path(__file__).resolve().parents[1] / "resources" / "icons"
SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
# Windows Explorer and the taskbar pick from these; larger ones only make the .ico heavy.
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)


def render(size: int) -> QImage:
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(ICONS / "frankenmoe.svg"))
    if not renderer.isValid():
        raise SystemExit("resources/icons/frankenmoe.svg is not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    # QPainter needs an application object to exist for fonts and colour handling.
    application = QGuiApplication(sys.argv[:1])
    images = {size: render(size) for size in SIZES}
    for size, image in images.items():
        target = ICONS / f"frankenmoe-{size}.png"
        if not image.save(str(target), "PNG"):
            raise SystemExit(f"cannot write {target}")
    # Qt's ICO writer stores one image per file; the .ico is assembled by hand from PNG entries,
    # which every Windows since Vista reads.
    write_ico(ICONS / "frankenmoe.ico", [ICONS / f"frankenmoe-{size}.png" for size in ICO_SIZES])
    application.quit()
    return 0


def write_ico(target: Path, pngs: list[Path]) -> None:
    from PySide6.QtGui import QImage

    entries = []
    for png in pngs:
        size = QImage(str(png)).width()
        entries.append((size, png.read_bytes()))
    header = struct.pack("<HHH", 0, 1, len(entries))
    offset = len(header) + 16 * len(entries)
    directory = b""
    for size, data in entries:
        # A width or height of 0 means 256 in the ICO directory.
        directory += struct.pack("<BBBBHHII", size % 256, size % 256, 0, 0, 1, 32, len(data), offset)
        offset += len(data)
    target.write_bytes(header + directory + b"".join(data for _, data in entries))


if __name__ == "__main__":
    sys.exit(main())
