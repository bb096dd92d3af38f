"""The library's user-facing error: a bad option, config field, file or adapter.

``DynmoleError`` is a ``ValueError``, so code that catches ``ValueError`` keeps working; its
message names the option, field or file at fault and says what to do.
"""


class DynmoleError(ValueError):
    """A mistake the user can fix (bad option or config value, incompatible adapter or checkpoint)."""
