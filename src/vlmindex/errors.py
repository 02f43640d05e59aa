"""The one exception type users see: a one-line message that names the input and says what to do."""


class VlmindexError(Exception):
    """A user-facing error. The CLI prints ``Error: <message>`` and exits non-zero, without a traceback."""


class WorkspaceBusy(VlmindexError):
    """Another process holds the workspace's write lock."""
