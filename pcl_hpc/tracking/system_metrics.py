"""System metrics (CPU, memory, GPU) sampled for the Tracker's run by MLflow's SystemMetricsMonitor."""

from __future__ import annotations

import logging

import torch

from pcl_hpc.tracking._common import _short

log = logging.getLogger(__package__)


def _system_metrics_monitor(run_id: str, uri: str, interval_s: float, resume: bool):
    """MLflow's SystemMetricsMonitor for ``run_id``: CPU and memory, GPU where present; None if unavailable.

    Only the CPU/memory monitor (psutil) and a GPU monitor are kept (MLflow's disk and network
    monitors are dropped to keep it cheap). The GPU monitor is MLflow's NVML/ROCm one when
    ``nvidia-ml-py`` / ``pyrsmi`` is installed, else a torch.cuda memory monitor.
    """
    try:
        from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except Exception as err:  # noqa: BLE001 - psutil missing, or an MLflow without system metrics
        log.info("tracking: no system metrics (%s)", _short(err))
        return None

    class TorchCudaMonitor(BaseMetricsMonitor):
        """GPU memory of this process per visible device, when NVML is not installed."""

        def collect_metrics(self):
            for i in range(torch.cuda.device_count()):
                self._metrics[f"gpu_{i}_memory_allocated_megabytes"].append(torch.cuda.memory_allocated(i) / 1e6)
                self._metrics[f"gpu_{i}_memory_reserved_megabytes"].append(torch.cuda.memory_reserved(i) / 1e6)

        def aggregate_metrics(self):
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}

    class Monitor(SystemMetricsMonitor):
        def finish(self, timeout_s: float = 5.0) -> None:
            """Stop the sampling thread without waiting long for an unreachable server."""
            thread, self._process = self._process, None
            if thread is None:
                return
            self._shutdown_event.set()
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                return
            try:
                if any(m.metrics for m in self.monitors):  # samples since the last publish (short runs)
                    self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as err:  # noqa: BLE001
                log.info("tracking: last system metrics not sent (%s)", _short(err))

    try:
        import psutil

        psutil.cpu_percent()  # the first call only sets the reference point
        monitor = Monitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=uri)
    except Exception as err:  # noqa: BLE001
        log.info("tracking: no system metrics (%s)", _short(err))
        return None
    kept = [m for m in monitor.monitors if isinstance(m, CPUMonitor) or "GPU" in type(m).__name__ or "ROCM" in type(m).__name__]
    if len(kept) == 1 and torch.cuda.is_available():
        kept.append(TorchCudaMonitor())
    monitor.monitors = kept
    return monitor
