"""The one exception type of the package.

Every user-facing failure (bad input, bad config, unfinished build) raises
:class:`DataPipelineError` with a one-line message that names the file and,
where it makes sense, the line.  The CLI prints it as
``data_pipeline: error: <message>`` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class DataPipelineError(Exception):
    """A clear, one-line, user-facing error (bad input, bad config, unfinished build)."""


def where(path: str, line: int | None = None) -> str:
    """``path`` or ``path:line`` for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
