"""The root of loopbot's own exceptions.

Every error loopbot raises on purpose (bad configuration, a prompt file that does not validate,
a model that cannot serve, a refused version change, a backup that cannot be made, …) derives
from :class:`LoopbotError`, so a command line catches it once and prints its message, while a
bug still ends in a traceback. Each subclass also keeps the builtin base it always had
(``ValueError`` for bad input, ``RuntimeError`` for a failing operation), so callers that
caught those keep working.
"""

from __future__ import annotations


class LoopbotError(Exception):
    """An error whose message is meant for the person who ran loopbot."""
