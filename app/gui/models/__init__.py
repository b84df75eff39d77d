"""Widgets of the Models page that outgrew app/gui/pages/models.py."""
