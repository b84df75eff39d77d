"""The transcript: the active path of the conversation, each generated token coloured by its expert.

It is built with text cursors, never from HTML, so text a model or a conversation file brings can
never turn into markup. Tokens, branch arrows and edit links are anchors, reported as signals.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QEvent, QUrl, Signal
from PySide6.QtGui import QColor, QFont, QPalette, QTextBlockFormat, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QTextBrowser, QWidget

from app.core.chat import Conversation, ExpertLegend, ExpertUsage, Message, TokenGenerated, TokenRouting
from app.core.chat.session import STOP_REASONS
from app.gui.chat.style import ExpertStyle
from app.gui.theme import is_dark

# How strongly a token's background takes its expert's colour: enough to tell experts apart,
# little enough that the text stays readable in either theme.
TINT_LIGHT = 0.45
TINT_DARK = 0.55


def _mix(a: QColor, b: QColor, t: float) -> QColor:
    return QColor.fromRgbF(
        a.redF() + (b.redF() - a.redF()) * t,
        a.greenF() + (b.greenF() - a.greenF()) * t,
        a.blueF() + (b.blueF() - a.blueF()) * t,
    )


def token_pieces(content: str, tokens: tuple[TokenRouting, ...]) -> list[str]:
    """Split an answer's text into one piece per generated token, for answers not streamed here.

    A token decoded alone may lose its leading space or be a partial character, so each token's
    text is looked up in the answer from where the previous one ended, and the piece runs up to
    the end of the match; a token that cannot be found gets no text, and the next found piece
    takes the gap. What is left over at the end goes to the last token.
    """
    pieces: list[str] = []
    cursor = 0
    unmatched = False
    for token in tokens:
        text = token.token.strip() or token.token
        found = content.find(text, cursor) if text and "\ufffd" not in text else -1
        if found >= 0 and (unmatched or not content[cursor:found].strip()):
            end = found + len(text)
            pieces.append(content[cursor:end])
            cursor, unmatched = end, False
        else:
            pieces.append("")
            unmatched = True
    if pieces and cursor < len(content):
        pieces[-1] += content[cursor:]
    return pieces


def describe_generation(message: Message) -> str:
    info = message.generation
    if info is None:
        return ""
    return (
        f"{len(info.generated)} tokens · {info.tokens_per_second:.1f} tokens/s · first token after "
        f"{info.time_to_first_token:.2f} s · seed {info.seed} · ended by {STOP_REASONS[info.stop_reason]}"
    )


class TranscriptView(QTextBrowser):
    token_pointed = Signal(object)  # the TokenRouting under the mouse, or None
    token_clicked = Signal(object)  # TokenRouting
    branch_clicked = Signal(str)  # the id of the message to show instead
    edit_clicked = Signal(str)  # the id of the message to edit
    palette_changed = Signal()  # the colours written into the transcript are out of date

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setMouseTracking(True)
        self.highlighted.connect(self._hovered)
        self.anchorClicked.connect(self._clicked)
        self.expert_style = ExpertStyle(ExpertLegend.default(0))
        self.color_slot: int | None = None  # the routed layer whose choice colours tokens; None: the majority
        # Every answer streamed here keeps its exact text pieces, one per token, by message id.
        self.pieces: dict[str, list[str]] = {}
        self.shown_tokens: list[TokenRouting] = []  # the tokens the transcript links to, by index
        self._stream_cursor: QTextCursor | None = None

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        # Sent once this widget's palette is the new one (its parent hears of a theme switch earlier).
        if event.type() == QEvent.Type.PaletteChange:
            self.palette_changed.emit()

    # ------------------------------------------------------------------ writing

    def render(
        self,
        conversation: Conversation,
        messages: list[Message],
        model_name: str,
        usage: ExpertUsage | None,
        pending_question: str = "",
        answering: bool = False,
        empty_text: str = "",
    ) -> None:
        """Rebuild the transcript from messages, counting their tokens into usage; while answering,
        the answer's header ends it and streamed tokens follow."""
        self.clear()
        self.shown_tokens = []
        cursor = QTextCursor(self.document())
        first = True
        for message in messages:
            self._write_message(cursor, conversation, message, model_name, usage, first)
            first = False
        if pending_question:
            self._write_header(cursor, conversation, "You", None, first)
            cursor.insertText(pending_question, QTextCharFormat())
            first = False
        self._stream_cursor = None
        if answering:
            self._write_header(cursor, conversation, model_name, None, first)
            self._stream_cursor = cursor
        if not messages and not pending_question and not answering:
            cursor.insertText(empty_text, self._muted_format())
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def stream(self, events: list[TokenGenerated], usage: ExpertUsage | None) -> None:
        """Append streamed tokens to the answer being written; the view follows them if it was at the end."""
        if self._stream_cursor is None:
            return
        scrollbar = self.verticalScrollBar()
        at_bottom = scrollbar.value() >= scrollbar.maximum() - 4
        for event in events:
            self._write_token(self._stream_cursor, event.token, event.text)
            if usage is not None and event.token.experts:
                usage.add(event.token)
        if at_bottom:
            scrollbar.setValue(scrollbar.maximum())

    def _muted_format(self) -> QTextCharFormat:
        muted = QTextCharFormat()
        muted.setForeground(self.palette().color(QPalette.ColorRole.PlaceholderText))
        return muted

    def _link_format(self, href: str) -> QTextCharFormat:
        link = QTextCharFormat()
        link.setAnchor(True)
        link.setAnchorHref(href)
        link.setForeground(self.palette().color(QPalette.ColorRole.Link))
        return link

    def _write_header(
        self, cursor: QTextCursor, conversation: Conversation, name: str, message: Message | None, first: bool
    ) -> None:
        block = QTextBlockFormat()
        block.setTopMargin(0 if first else 14)
        if first:
            cursor.setBlockFormat(block)
        else:
            cursor.insertBlock(block)
        bold = QTextCharFormat()
        bold.setFontWeight(QFont.Weight.Bold)
        cursor.insertText(name, bold)
        if message is not None:
            siblings = conversation.siblings(message.id)
            if len(siblings) > 1:
                index = [s.id for s in siblings].index(message.id)
                cursor.insertText("   ", QTextCharFormat())
                if index > 0:
                    cursor.insertText("◀", self._link_format(f"branch:{siblings[index - 1].id}"))
                cursor.insertText(f" {index + 1}/{len(siblings)} ", self._muted_format())
                if index < len(siblings) - 1:
                    cursor.insertText("▶", self._link_format(f"branch:{siblings[index + 1].id}"))
            cursor.insertText("   ", QTextCharFormat())
            cursor.insertText("edit", self._link_format(f"edit:{message.id}"))
        cursor.insertBlock(QTextBlockFormat())

    def _write_message(
        self,
        cursor: QTextCursor,
        conversation: Conversation,
        message: Message,
        model_name: str,
        usage: ExpertUsage | None,
        first: bool,
    ) -> None:
        name = "You" if message.role == "user" else model_name
        self._write_header(cursor, conversation, name, message, first)
        generation = message.generation
        if generation is None or not generation.generated:
            cursor.insertText(message.content, QTextCharFormat())
            return
        pieces = self.pieces.get(message.id) or token_pieces(message.content, generation.generated)
        for token, piece in zip(generation.generated, pieces, strict=True):
            self._write_token(cursor, token, piece)
            if usage is not None and token.experts:
                usage.add(token)
        cursor.insertBlock(QTextBlockFormat())
        cursor.insertText(describe_generation(message), self._muted_format())

    def _write_token(self, cursor: QTextCursor, token: TokenRouting, text: str) -> None:
        if not text:
            return
        if not token.experts:
            cursor.insertText(text, QTextCharFormat())
            return
        self.shown_tokens.append(token)
        token_format = QTextCharFormat()
        token_format.setAnchor(True)
        token_format.setAnchorHref(f"token:{len(self.shown_tokens) - 1}")
        token_format.setBackground(self.token_background(token))
        token_format.setForeground(self.palette().color(QPalette.ColorRole.Text))
        token_format.setToolTip(self.token_tooltip(token))
        cursor.insertText(text, token_format)

    # ------------------------------------------------------------------ tokens

    def _color_slot(self, token: TokenRouting) -> int | None:
        slot = self.color_slot
        return slot if slot is not None and slot < len(token.experts) else None

    def token_background(self, token: TokenRouting) -> QColor:
        expert = token.top_expert(self._color_slot(token))
        base = self.palette().color(QPalette.ColorRole.Base)
        tint = TINT_DARK if is_dark(self.palette()) else TINT_LIGHT
        return _mix(base, QColor(self.expert_style.color(expert)), tint)

    def token_tooltip(self, token: TokenRouting) -> str:
        """The token and its expert, as rich text with both escaped once.

        Qt guesses whether a tooltip is rich text, and a token such as "&lt;" would fool the guess
        either way; the <qt> tag settles it, and white-space: pre keeps the token's spaces.
        """
        expert = token.top_expert(self._color_slot(token))
        text = f"{token.token!r}: {self.expert_style.label(expert)}"
        return f'<qt><p style="white-space:pre">{html.escape(text, quote=False)}</p></qt>'

    def _hovered(self, url: QUrl) -> None:
        kind, _, value = url.toString().partition(":")
        self.token_pointed.emit(self.shown_tokens[int(value)] if kind == "token" else None)

    def _clicked(self, url: QUrl) -> None:
        kind, _, value = url.toString().partition(":")
        if kind == "token":
            self.token_clicked.emit(self.shown_tokens[int(value)])
        elif kind == "branch":
            self.branch_clicked.emit(value)
        elif kind == "edit":
            self.edit_clicked.emit(value)
