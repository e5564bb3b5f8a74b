"""System metrics of a training (CPU, memory, disk, network; GPU where NVML sees one) as MLflow's
``system/...`` metrics, which its UI shows in the run's "System metrics" tab.

MLflow's own ``SystemMetricsMonitor`` logs straight to the server and stops at the first failed
call; this sampler uses MLflow's collectors but hands each sample to the tracker, so the samples
go through the journal like every other record (``pipeline.tracking``) and survive a server that
is away. The interval is ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` if set, else 10 s.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


def monitors() -> list[Any]:
    """MLflow's collectors: CPU and memory, disk, network, and the NVIDIA GPUs when there are any."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found.append(GPUMonitor())
    except Exception as e:  # noqa: BLE001 - no NVML, no GPU, or no nvidia-ml-py: no GPU metrics
        log.debug("no GPU metrics: %s", e)
    return found


def sample(collectors: list[Any]) -> dict[str, float]:
    """One sample of every collector, as ``system/<name>`` values."""
    out: dict[str, float] = {}
    for m in collectors:
        m.collect_metrics()
        out.update({f"system/{k}": float(v) for k, v in m.aggregate_metrics().items()})
        m.clear_metrics()
    return out


def start_sampler(log_metrics: Callable[[dict[str, float], int], None],
                  interval_s: float | None = None, first_step: int = 0) -> Callable[[], None]:
    """Sample every ``interval_s`` seconds in a daemon thread, calling ``log_metrics(values,
    step)`` with step ``first_step``, then one more each time; returns the function that takes a
    last sample and stops it."""
    interval = float(interval_s or os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or DEFAULT_INTERVAL_S)
    try:
        import psutil

        collectors = monitors()
        psutil.cpu_percent()  # the first reading of CPU use is meaningless: start the clock now
    except Exception as e:  # noqa: BLE001 - system metrics are a nicety; training goes on without
        log.warning("no system metrics (%s: %s); pip install psutil", type(e).__name__, e)
        return lambda: None
    stop, step = threading.Event(), [first_step]

    def _log() -> None:
        try:
            log_metrics(sample(collectors), step[0])
            step[0] += 1
        except Exception as e:  # noqa: BLE001 - a failing collector must not kill the thread's owner
            log.debug("system metrics sample failed: %s", e)

    def _loop() -> None:
        while not stop.wait(interval):
            _log()

    thread = threading.Thread(target=_loop, name="segpipe-system-metrics", daemon=True)
    thread.start()

    def _stop() -> None:
        stop.set()
        thread.join(timeout=interval + 5)
        _log()

    return _stop
