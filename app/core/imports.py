"""One lock for importing from transformers in threads that may run side by side.

transformers replaces its package with a lazy module that imports classes on first access. While one
thread is still inside such an import, another can be told that the class does not exist
("cannot import name 'AutoTokenizer' from 'transformers'"): seen when a merge imported its config
class in one thread while the gate computation imported the tokenizer in another.
"""

from __future__ import annotations

import threading

TRANSFORMERS_IMPORT_LOCK = threading.RLock()
