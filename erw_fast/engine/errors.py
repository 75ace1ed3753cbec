"""The errors a run raises on purpose (the CLI turns them into one-line messages)."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN/inf; the last good checkpoint on disk is left untouched."""

    exit_code = 1


class RunFolderError(ValueError):
    """The output folder already holds another run (and --resume was not given)."""


class StepMemoryError(RuntimeError):
    """A training step ran out of memory (the message names the batch and --grad-accum)."""


class PeerLostError(RuntimeError):
    """Under torchrun, another process of the run died (a collective failed)."""
