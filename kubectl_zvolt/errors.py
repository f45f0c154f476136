"""The one error type the plugin reports to the user (message only, exit status 1)."""


class PluginError(Exception):
    """A failure the user can act on; the message says what to do."""
