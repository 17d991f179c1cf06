"""Progress reporting of the replicas in an epoch, silent by default."""


class Progress:
    """Counts replicas as they are issued and finished; the CLI subclasses it with a progress bar."""

    def add(self, count: int) -> None:
        """Add `count` replicas to the total."""

    def advance(self) -> None:
        """Mark one replica as finished, whatever its outcome."""

    def close(self) -> None:
        """End the display at the end of the epoch."""
