"""Error types the CLI maps to exit codes: 1 = the work failed, 2 = usage."""

import re


class SegpipeError(Exception):
    """A failure to report as one line; exit code 1 (work failed)."""

    exit_code = 1


class InputError(SegpipeError):
    """Bad input data; the message names the file and the problem."""


class UsageError(SegpipeError):
    """Bad command-line use or bundle/config reference; exit code 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending a job, ``kill``, torchrun stopping its workers), raised where
    the main thread is, so the work cleans up as after Ctrl-C: a training's MLflow run ends KILLED,
    a batch's temp files go and its index.html is finished. The CLI exits 143."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries wrap causes in pages of
    text), or its type name when it has none."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def causes(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost
    first; MONAI wraps a transform's failure in ``RuntimeError("applying transform ...")``."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain


def describe(e: BaseException) -> str:
    """One line for an unexpected error: its type and first line, and where it wraps another,
    the innermost cause's too (``RuntimeError: applying transform LoadImaged -> EOFError: ...``);
    object addresses left out."""
    chain = causes(e)
    parts = [f"{type(x).__name__}: {first_line(x)}" for x in (chain[0], chain[-1]) if str(x).strip()] or [type(e).__name__]
    text = " -> ".join(dict.fromkeys(parts))
    return re.sub(r"<(?:\S*\.)?(\w+) object at 0x[0-9a-f]+>", r"\1", text)


def wrapped_segpipe_error(e: BaseException) -> "SegpipeError | None":
    """The ``SegpipeError`` that ``e`` wraps (raised inside a library's callback), if any."""
    return next((x for x in causes(e) if isinstance(x, SegpipeError)), None)
