"""The errors a user sees as one ``error:`` line and exit code 2: a bad config, a run that cannot go on."""


class ConfigError(ValueError):
    """A bad config; the message names the file (or command-line override) and the dotted key."""


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad inputs, a non-finite loss); the message names the cause."""
