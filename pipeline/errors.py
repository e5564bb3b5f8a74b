"""Error types the CLI maps to exit codes: 1 = the work failed, 2 = usage."""


class SegpipeError(Exception):
    """A failure to report as one line; exit code 1 (work failed)."""

    exit_code = 1


class InputError(SegpipeError):
    """Bad input data; the message names the file and the problem."""


class UsageError(SegpipeError):
    """Bad command-line use or bundle/config reference; exit code 2."""

    exit_code = 2


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries wrap causes in pages of
    text), or its type name when it has none."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
