"""The one exception type of the package.

Every user-facing failure (bad task name, missing file, bad label, bad setting) raises
`FinetuneError` with a one-line message naming what and where (`path:line` for data files).
The CLI prints it as `finetune: error: <message>` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A clear, one-line, user-facing error."""


def where(path: object, line: int | None = None) -> str:
    """`path` or `path:line` for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
