"""Error types the CLI maps to exit codes: 1 = the work failed, 2 = usage."""

import contextlib
import re
from collections.abc import Iterator


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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT are held, then acted on as soon as it ends (in the main
    thread; elsewhere, or where a signal is not handled in Python, nothing changes). For writes
    that must not stop half-way: a kill landing inside an MLflow store call could leave its
    database session unusable, so the run could not be marked KILLED after it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, object]] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    old = {s: h for s, h in old.items() if callable(h)}  # Python handlers only (not SIG_DFL / SIG_IGN)
    for s in old:
        signal.signal(s, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            signum, frame = held[0]
            old[signum](signum, frame)  # raises Terminated / KeyboardInterrupt here, between writes


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
