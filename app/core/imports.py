"""One lock for importing from transformers in threads that may run side by side.

transformers replaces its package with a lazy module that imports classes on first access. While one
thread is still inside such an import, another can be told that the class does not exist
("cannot import name 'AutoTokenizer' from 'transformers'"; seen with two merge threads importing at
once). The app's background import, the chat's model loading and the gate computation's fallbacks
can run together, so they take this lock around their imports.
"""

from __future__ import annotations

import threading

TRANSFORMERS_IMPORT_LOCK = threading.RLock()
