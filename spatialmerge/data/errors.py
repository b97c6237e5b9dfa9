"""The one exception a wrong dataset location or layout raises."""

from __future__ import annotations


class DatasetLayoutError(FileNotFoundError):
    """A dataset is missing, or is not laid out on disk the way its loader expects.

    Subclasses FileNotFoundError so generic "file missing" handling still catches it; the message
    names the path looked at, the layout expected, where the data comes from and the config key
    that points at it.
    """
