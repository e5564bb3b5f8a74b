"""Error types the CLI maps to exit codes: 1 = the work failed, 2 = usage."""


class SegpipeError(Exception):
    """A failure to report as one line; exit code 1 (work failed)."""

    exit_code = 1


class InputError(SegpipeError):
    """Bad input data; the message names the file and the problem."""


class UsageError(SegpipeError):
    """Bad command-line use or bundle/config reference; exit code 2."""

    exit_code = 2
