"""The one exception type for user mistakes.

Every check of user input (a flag, a file, a config value, a policy or suite name) raises `UserError` (or a
subclass: `ConfigError`, `TaskFileError`) with a message that names what is wrong and where. `mosaic-ray` prints
it as one line, without a traceback, and exits with code 2, before any work starts.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A user mistake; the message names what and where (file, row, dotted key, flag) and, when known, the fix."""
