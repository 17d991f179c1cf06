"""Errors that stop a run, each shown to the operator as one clear message with an exit code."""

import click


class FarmError(click.ClickException):
    """A run cannot continue; the message gives the cause and the next step."""

    exit_code = 1


class StaffingError(FarmError):
    """Too few live, healthy workers to place every replica of a job on a distinct worker."""

    exit_code = 3


class QuorumError(FarmError):
    """A segment cannot reach its quorum within the re-issue limit."""

    exit_code = 4
