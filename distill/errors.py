"""One exception type for every error a user can act on.

The CLI prints these as a one-line message (no traceback) and exits 2.
"""


class DistillError(Exception):
    """An error with an actionable message for the user."""
