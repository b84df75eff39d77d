"""The engine: Qt-free, never prints or exits.

Modules here import torch and transformers only inside the functions that need them, so that
reading a recipe or checking compatibility stays fast and the GUI can start before they load.
"""
