"""
``/metrics`` of every worker, whichever worker answers the scrape.

With ``--workers N`` a scrape of the shared port lands on any one process,
so each process writes a snapshot of its own registry every
L{SNAPSHOT_INTERVAL} seconds (and when it stops) into a directory the main
process made for them (L{METRICS_DIR_ENV}). The process answering
``/metrics`` serves its own series live and the others' from their
snapshots, every series labelled ``worker="<index>"`` (0 is the main
process): per-process series, summed in queries (``sum without
(worker)``). A worker's series are at most L{SNAPSHOT_INTERVAL} seconds old.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: The directory holding every worker's snapshot (set by the main process).
METRICS_DIR_ENV = "HAMMAL_WORKER_METRICS_DIR"
#: Seconds between a worker's snapshots.
SNAPSHOT_INTERVAL = 2.0
#: The label naming the process a series comes from.
WORKER_LABEL = "worker"

log = Logger()


def metrics_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The snapshot directory, when this process is one of several."""
    environ = os.environ if environ is None else environ
    return environ.get(METRICS_DIR_ENV) or None


def _snapshot_name(index: int) -> str:
    return f"worker-{index}.prom"


class AllWorkers:
    """
    A collector: C{own}'s metrics (live) and the other workers' (from
    their snapshots in C{directory}), each sample labelled with its worker.
    """

    def __init__(self, own: CollectorRegistry, directory: str, index: int) -> None:
        self._own = own
        self._directory = directory
        self._index = index

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        self._add(merged, self._own.collect(), str(self._index))
        for name in sorted(_listdir(self._directory)):
            if not (name.startswith("worker-") and name.endswith(".prom")):
                continue
            worker = name[len("worker-") : -len(".prom")]
            if worker == str(self._index):
                continue
            try:
                with open(os.path.join(self._directory, name), encoding="utf-8") as snapshot:
                    text = snapshot.read()
                families = list(text_string_to_metric_families(text))
            except (OSError, ValueError):
                continue  # being replaced, or gone: next scrape
            self._add(merged, families, worker)
        return list(merged.values())

    @staticmethod
    def _add(merged: dict[str, Metric], families: Iterable[Metric], worker: str) -> None:
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for sample in family.samples:
                labels = {**sample.labels, WORKER_LABEL: worker}
                target.samples.append(sample._replace(labels=labels))


def registry_for(
    own: CollectorRegistry, index: int, environ: Mapping[str, str] | None = None
) -> Any:
    """What ``/metrics`` renders: C{own} alone, or every worker's series."""
    directory = metrics_dir(environ)
    if directory is None:
        return own
    combined = CollectorRegistry(auto_describe=False)
    combined.register(AllWorkers(own, directory, index))
    return combined


class MetricsSnapshots(Service):
    """Writes this worker's registry to its snapshot file, periodically and at stop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        directory: str,
        index: int,
        clock: Any,
        interval: float = SNAPSHOT_INTERVAL,
    ) -> None:
        self._registry = registry
        self._path = os.path.join(directory, _snapshot_name(index))
        self._loop = LoopingCall(self.write)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.write()

    def write(self) -> None:
        """Replace the snapshot atomically (readers never see half of one)."""
        temporary = f"{self._path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as snapshot:
                snapshot.write(generate_latest(self._registry))
            os.replace(temporary, self._path)
        except OSError as failure:
            log.warn("cannot write the metrics snapshot: {error}", error=failure.strerror)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
