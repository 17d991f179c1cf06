"""Errors that stop a run, each shown to the operator as one clear message with an exit code."""

import click


class FarmError(click.ClickException):
    """A run cannot continue; the message gives the cause and the next step."""

    exit_code = 1


class StaffingError(FarmError):
    """No numerical class contains enough live, healthy workers of distinct owners for every replica of a job."""

    exit_code = 3


class QuorumError(FarmError):
    """A segment cannot reach its quorum within the re-issue limit."""

    exit_code = 4
