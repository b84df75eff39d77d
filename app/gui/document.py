"""The open recipe as a document: one immutable Recipe snapshot, a file path and an undo stack.

Every edit replaces the snapshot through a :class:`RecipeEdit` command, so undo and redo are the
swap of two frozen Recipes and can never leave the document half-changed.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack

from app.core.recipe import ModelRef, Recipe, load_recipe, save_recipe


def empty_recipe() -> Recipe:
    return Recipe(base_model=ModelRef(path=""), experts=())


class RecipeEdit(QUndoCommand):
    def __init__(self, document: RecipeDocument, before: Recipe, after: Recipe, text: str, merge_id: int) -> None:
        super().__init__(text)
        self._document = document
        self._before = before
        self._after = after
        self._merge_id = merge_id

    def id(self) -> int:
        return self._merge_id

    def mergeWith(self, other: QUndoCommand) -> bool:
        # Typing into one field makes one undo step, not one per keystroke.
        if not isinstance(other, RecipeEdit) or other.id() != self.id() or self.id() < 0:
            return False
        self._after = other._after
        return True

    def redo(self) -> None:
        self._document._replace(self._after)

    def undo(self) -> None:
        self._document._replace(self._before)


class RecipeDocument(QObject):
    """Emits ``changed`` with the new Recipe after every edit, undo, redo and load."""

    changed = Signal(object)
    path_changed = Signal(object)
    opened = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.undo_stack = QUndoStack(self)
        self._recipe = empty_recipe()
        self._path: Path | None = None
        self._is_open = False

    @property
    def recipe(self) -> Recipe:
        return self._recipe

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def is_open(self) -> bool:
        """False on the start screen, before New, Open or the demo."""
        return self._is_open

    @property
    def is_modified(self) -> bool:
        return not self.undo_stack.isClean()

    @property
    def display_name(self) -> str:
        return self._path.name if self._path else "Untitled recipe"

    def edit(self, after: Recipe, text: str, merge_id: int = -1) -> None:
        """Record an edit; ``merge_id`` >= 0 merges consecutive edits of the same field into one step."""
        if after == self._recipe:
            return
        self.undo_stack.push(RecipeEdit(self, self._recipe, after, text, merge_id))

    def new(self) -> None:
        self._reset(empty_recipe(), None)

    def open(self, path: Path) -> None:
        """Raises ProblemsError (with line numbers) when the file is not a valid recipe."""
        self._reset(load_recipe(path), path)

    def save(self, path: Path | None = None) -> None:
        target = path or self._path
        if target is None:
            raise ValueError("the document has no file yet; pass a path")
        save_recipe(self._recipe, target)
        self.undo_stack.setClean()
        if target != self._path:
            self._path = target
            self.path_changed.emit(target)

    def _reset(self, recipe: Recipe, path: Path | None) -> None:
        self.undo_stack.clear()
        self._recipe = recipe
        self._path = path
        self._is_open = True
        self.path_changed.emit(path)
        self.opened.emit()
        self.changed.emit(recipe)

    def _replace(self, recipe: Recipe) -> None:
        self._recipe = recipe
        self.changed.emit(recipe)
