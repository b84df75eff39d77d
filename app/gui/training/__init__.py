"""The Train routers page's parts: the settings form, the live charts, the before/after view and the jobs."""
