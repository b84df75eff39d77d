"""The chat page's widgets: the model box, the transcript, the routing panel and the controls.

The page (:mod:`app.gui.pages.chat`) owns the conversation and the state; these widgets show what
it gives them and report what the user does.
"""
