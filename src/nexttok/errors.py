"""The one exception type users see: a message that names the problem and the fix."""


class NexttokError(ValueError):
    """Bad input or an unusable environment. The CLI prints ``error: <message>`` and exits 2;
    the server answers HTTP 400 with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NexttokNotice(UserWarning):
    """Something the user asked for runs another way here (for example bf16 on a CPU without native
    bf16 runs in float32). The CLI prints ``note: <message>`` on one line."""
