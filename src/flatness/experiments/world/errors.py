"""An invalid argument of a pipeline function, named as the function names it.

The pipeline checks its arguments once, where they are used, and says which parameter is wrong
in its own terms, the name in backticks (``"`seeds` must be ..."``); a front end that spells
the parameters otherwise (the CLI: ``--seeds``, ``--lambdas`` for ``values``) rewrites the
names with :meth:`SettingError.spelled`.

Example:
    >>> error = SettingError("`jobs` must be >= 1, got 0", "jobs")
    >>> str(error)
    '`jobs` must be >= 1, got 0'
    >>> error.spelled({"jobs": "--jobs"})
    '--jobs must be >= 1, got 0'
"""

from __future__ import annotations

from collections.abc import Mapping

from ...utils import FlatnessError

__all__ = ["SettingError"]


class SettingError(FlatnessError):
    """A :class:`~flatness.FlatnessError` about the arguments ``parameters`` of a pipeline call.

    Args:
        message: one line that writes each parameter's name in backticks (``"`values` must be ..."``).
        parameters: the names written so, in the function's terms.
    """

    def __init__(self, message: str, *parameters: str) -> None:
        super().__init__(message)
        self.message = message
        self.parameters = parameters

    def spelled(self, names: Mapping[str, str]) -> str:
        """The message with each parameter in ``names`` written as its value there (a flag)."""
        text = self.message
        for parameter in self.parameters:
            if parameter in names:
                text = text.replace(f"`{parameter}`", names[parameter])
        return text
