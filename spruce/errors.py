"""The one exception a user can cause: the CLI prints its message on one line and exits 2."""


class SpruceError(Exception):
    """Bad input or an unavailable resource, with a message that says what to do."""
