"""Light and dark palettes for the Fusion style, following the system's colour scheme."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

SCHEMES = ("system", "light", "dark")


def _dark_palette() -> QPalette:
    palette = QPalette()
    roles = QPalette.ColorRole
    window, base, text = QColor("#202124"), QColor("#17181a"), QColor("#e8eaed")
    palette.setColor(roles.Window, window)
    palette.setColor(roles.WindowText, text)
    palette.setColor(roles.Base, base)
    palette.setColor(roles.AlternateBase, QColor("#26282b"))
    palette.setColor(roles.ToolTipBase, QColor("#2d2f33"))
    palette.setColor(roles.ToolTipText, text)
    palette.setColor(roles.PlaceholderText, QColor("#9aa0a6"))
    palette.setColor(roles.Text, text)
    palette.setColor(roles.Button, QColor("#2d2f33"))
    palette.setColor(roles.ButtonText, text)
    palette.setColor(roles.BrightText, QColor("#ff6b6b"))
    palette.setColor(roles.Link, QColor("#8ab4f8"))
    palette.setColor(roles.Highlight, QColor("#3b6fb6"))
    palette.setColor(roles.HighlightedText, QColor("#ffffff"))
    palette.setColor(roles.Mid, QColor("#3c4043"))
    palette.setColor(roles.Midlight, QColor("#34373b"))
    palette.setColor(roles.Dark, QColor("#101113"))
    palette.setColor(roles.Light, QColor("#4a4d51"))
    disabled = QPalette.ColorGroup.Disabled
    for role in (roles.Text, roles.ButtonText, roles.WindowText):
        palette.setColor(disabled, role, QColor("#7f8388"))
    return palette


def system_is_dark(app: QApplication) -> bool:
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply_theme(app: QApplication, scheme: str = "system") -> bool:
    """Set the palette for ``scheme``; returns whether the result is dark."""
    app.setStyle("Fusion")
    dark = scheme == "dark" or (scheme == "system" and system_is_dark(app))
    app.setPalette(_dark_palette() if dark else app.style().standardPalette())
    return dark


def follow_system_theme(app: QApplication) -> None:
    app.styleHints().colorSchemeChanged.connect(lambda _scheme: apply_theme(app, "system"))


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128
