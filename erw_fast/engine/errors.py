"""The errors a run raises on purpose (the CLI turns them into one-line messages)."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN/inf; the last good checkpoint on disk is left untouched."""

    exit_code = 1


class RunFolderError(ValueError):
    """The output folder already holds another run (and --resume was not given)."""
