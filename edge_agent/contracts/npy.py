"""One lock for every ``np.load`` in the process (bundle self-tests, the local API's encodings)."""

from __future__ import annotations

import threading

#: numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST constructor is not
#: thread-safe (gh-106905: sporadic "SystemError: AST constructor recursion depth mismatch"
#: under concurrent requests). Every np.load in the agent goes through
#: this lock; parsing a
#: header takes microseconds, the array bytes are a copy.
NPY_LOCK = threading.Lock()
