"""The node's Prometheus metrics: counters and histograms the running node moves as it works,
and gauges read from the spool index and the outbox at each scrape.

Each `Node` has its own registry (tests run several nodes in one process). Labels are stage
names, destination names and states: never a UID, never patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.ingest.spool import Spool, disk_free_bytes
from node.records import DeliveryState, StudyStatus
from node.store.db import Row

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Stage latencies run from milliseconds (routing) to minutes (inference on a large study).
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# From a study's first instance to its results in the outbox: seconds to hours.
TIME_TO_RESULT_BUCKETS_S = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class NodeMetrics:
    """What the running node counts; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "neuronode_instances_received",
            "Instances answered with success (stored, or a duplicate already stored).",
            registry=r,
        )
        self.instances_rejected = Counter(
            "neuronode_instances_rejected",
            "Instances refused with a failure status and not kept (low disk, write errors).",
            ["reason"],
            registry=r,
        )
        self.instances_quarantined = Counter(
            "neuronode_instances_quarantined",
            "Instances refused and put in quarantine (unparseable or inconsistent).",
            registry=r,
        )
        self.studies_processed = Counter(
            "neuronode_studies_processed",
            "Study jobs that finished with results (or a recorded skip).",
            registry=r,
        )
        self.studies_failed = Counter(
            "neuronode_studies_failed",
            "Failed study job attempts, by the stage that failed and what became of the job.",
            ["stage", "state"],
            registry=r,
        )
        self.deliveries_sent = Counter(
            "neuronode_deliveries_sent",
            "Result objects a destination accepted.",
            ["destination"],
            registry=r,
        )
        self.deliveries_failed = Counter(
            "neuronode_deliveries_failed",
            "Failed delivery attempts (retried later, or dead-lettered).",
            ["destination"],
            registry=r,
        )
        self.deliveries_dead = Counter(
            "neuronode_deliveries_dead_lettered",
            "Deliveries moved to the dead letter (neuronode requeue sends them again).",
            ["destination"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "neuronode_stage_seconds",
            "Time spent in each pipeline stage of a study job.",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.time_to_result = Histogram(
            "neuronode_study_time_to_result_seconds",
            "From a study's first instance (of this round) to its results queued for delivery.",
            buckets=TIME_TO_RESULT_BUCKETS_S,
            registry=r,
        )
        self.last_study_processed = Gauge(
            "neuronode_last_study_processed_timestamp_seconds",
            "Unix time of the last study job that finished with results (0: none yet).",
            registry=r,
        )
        self.studies_purged = Counter(
            "neuronode_studies_purged",
            "Studies retention removed from the spool (delivered everywhere, or not qualifying).",
            registry=r,
        )
        self.rules_reload_refused = Counter(
            "neuronode_rules_reload_refused",
            "Changed rule files that were refused (invalid: the old rules stay in force).",
            registry=r,
        )
        self.rules_reloaded = Counter(
            "neuronode_rules_reloaded",
            "Changed rule files that were validated and applied.",
            registry=r,
        )
        self.job_timeouts = Counter(
            "neuronode_job_timeouts",
            "Study jobs stopped at processing.timeout_s (their worker process killed).",
            registry=r,
        )
        self.worker_restarts = Counter(
            "neuronode_worker_restarts",
            "Worker processes replaced after a job timeout or a crash (segfault, OOM kill).",
            registry=r,
        )
        self.workers_ready = Gauge(
            "neuronode_workers_ready",
            "Worker processes with their models loaded, waiting for or running a job.",
            registry=r,
        )

    def watch(self, spool: Spool, *, active_associations: Callable[[], int]) -> None:
        """Add the gauges read at each scrape from this spool (index, outbox, disk)."""
        self.registry.register(_SpoolCollector(spool, active_associations))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _SpoolCollector(Collector):
    """Gauges read at scrape time: nothing to keep in step with the index."""

    def __init__(self, spool: Spool, active_associations: Callable[[], int]) -> None:
        self.spool = spool
        self.active = active_associations

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (the index may not be readable at start)

    def collect(self) -> Iterator[Metric]:
        index = self.spool.index
        studies = index.studies_by_state()
        jobs = _by_state(index.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"))
        g = GaugeMetricFamily(
            "neuronode_studies", "Studies in the spool index by state.", labels=["state"]
        )
        for state, n in studies.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("neuronode_jobs", "Study jobs by state.", labels=["state"])
        for s in StudyStatus:
            if s is not StudyStatus.RECEIVING:
                g.add_metric([s.value], jobs.get(s.value, 0))
        yield g
        yield GaugeMetricFamily(
            "neuronode_queue_depth",
            "Study jobs ready and waiting for a worker.",
            value=jobs.get(StudyStatus.READY.value, 0),
        )
        yield GaugeMetricFamily(
            "neuronode_jobs_dead",
            "Study jobs in the dead letter (neuronode requeue takes them up again).",
            value=jobs.get(StudyStatus.DEAD.value, 0),
        )
        n_instances = int(index.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])
        n_quarantined = int(index.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"])
        yield GaugeMetricFamily(
            "neuronode_spool_instances",
            "Instances in the spool index (purged studies leave it).",
            value=n_instances,
        )
        yield GaugeMetricFamily(
            "neuronode_quarantine_files",
            "Distinct instances kept in quarantine.",
            value=n_quarantined,
        )
        yield from _outbox_gauges(self.spool.root, self.spool.index.url_if_shared)
        yield GaugeMetricFamily(
            "neuronode_active_associations",
            "DICOM associations open now.",
            value=self.active(),
        )
        yield GaugeMetricFamily(
            "neuronode_spool_free_bytes",
            "Free bytes on the spool's file system.",
            value=disk_free_bytes(self.spool.root),
        )
        yield GaugeMetricFamily(
            "neuronode_spool_min_free_bytes",
            "Free-space floor below which C-STORE gets 0xA700.",
            value=self.spool.min_free_bytes,
        )


def _by_state(rows: list[Row]) -> dict[str, int]:
    return {str(r["state"]): int(r["n"]) for r in rows}


def _outbox_gauges(spool_dir: Path, database_url: str | None = None) -> Iterator[Metric]:
    # Imported at the first scrape, not at start: the listener opens before the sender's
    # DICOM libraries load (launch to first C-ECHO).
    from node.deliver.outbox import delivery_counts

    counts = delivery_counts(spool_dir, database_url=database_url)
    rows = GaugeMetricFamily(
        "neuronode_outbox",
        "Outbox rows by destination and state.",
        labels=["destination", "state"],
    )
    depth = GaugeMetricFamily(
        "neuronode_outbox_depth",
        "Outbox rows still to send (pending or sending), by destination.",
        labels=["destination"],
    )
    for name, states in sorted(counts.items()):
        for state in DeliveryState:
            rows.add_metric([name, state.value], states.get(state.value, 0))
        depth.add_metric(
            [name],
            states.get(DeliveryState.PENDING.value, 0) + states.get(DeliveryState.SENDING.value, 0),
        )
    yield rows
    yield depth
