"""What a training prints on the console: the engines' chatty loggers quietened, the report of an
error the CLI reports itself in one line dropped, and the epochs' progress bar (``train.train_bundle``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import SegpipeError

CHATTY_LOGGERS = ("ignite", "monai.handlers.StatsHandler", "pipeline.handlers.epochs")


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def not_our_error(record: logging.LogRecord) -> bool:
    """Drop the engines' and MONAI StatsHandler's report of an exception the CLI reports in one line
    itself: one of ours (a ``SegpipeError``, one line by design) or Ctrl-C / SIGTERM. Ignite logs
    "Engine run is terminating due to exception" and StatsHandler the traceback, about 20 lines a
    process, before the CLI's 'interrupted' (``--debug`` shows the traceback)."""
    error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    if not isinstance(error, (SegpipeError, KeyboardInterrupt)):
        return True
    return not (record.exc_info or record.getMessage().startswith("Engine run is terminating due to exception"))


@contextmanager
def console(verbose: bool, progress: bool) -> Iterator[Any]:
    """Quiet the chatty loggers unless ``verbose`` (a level for their children, a filter for
    themselves: MONAI resets StatsHandler's level when a bundle builds one); with ``progress``
    yield a progress bar for the epochs and route console logging through it (so log lines do
    not tear the bar)."""
    loggers = [] if verbose else [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
        lg.addFilter(_below_warning)
    stats = logging.getLogger("monai.handlers.StatsHandler")  # MONAI's get_logger: its own handler, no propagation
    stats.addFilter(not_our_error)
    handlers = list(logging.getLogger().handlers)  # the records of loggers that propagate
    for h in handlers:
        h.addFilter(not_our_error)
    try:
        if progress:
            from ignite.handlers import ProgressBar
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                for h in logging.getLogger().handlers:  # tqdm's own, in place of the console's
                    if h not in handlers:
                        h.addFilter(not_our_error)
                yield ProgressBar(persist=False, bar_format="{desc}[{n_fmt}/{total_fmt}] {bar:20} {elapsed}<{remaining}{postfix}")
        else:
            yield None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
            lg.removeFilter(_below_warning)
        stats.removeFilter(not_our_error)
        for h in handlers:
            h.removeFilter(not_our_error)
