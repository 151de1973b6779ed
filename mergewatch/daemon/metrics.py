"""Prometheus metrics of one daemon (DESIGN §3.4).

Every metric lives in the daemon's own ``CollectorRegistry`` (never the process-global default, so two
daemons in one test process, or a library user's own metrics, never collide). Names carry the
``mergewatch_`` prefix, counters end in ``_total``, durations are histograms in seconds.

Labels are a closed set fixed at construction (outcomes, views, job names, the policy name): a label
value is never an expert id, a path or anything else that grows with the data, so the number of
series stays constant for the life of the process. Every label value is initialised up front, so a
counter that never fired reads 0 instead of being absent (``rate()`` and alerts need the series).

Exposed metrics (``mergewatch_`` omitted)::

    queue_depth                        gauge      drops claimed and waiting for the worker
    experts_total{outcome, reason}     counter    merged | rejected | duplicate; reason: the class of a
                                                  rejection (errors.REJECT_CLASSES), "" otherwise
    step                               gauge      index of the last committed strategy step
    current_version{view}              gauge      version `current` points to (deploy | init); 0 = none
    latest_version{view}               gauge      newest published version; differs from current_version
                                                  while a deploy gate holds a version back
    merge_duration_seconds             histogram  one strategy step (validate excluded)
    publish_duration_seconds           histogram  staging + fsync + rename + pointer swap, both views
    evaluate_duration_seconds          histogram  one evaluation of a published version
    drop_to_publish_seconds            histogram  drop first seen in the inbox (a copied drop's quiet
                                                  period included) -> its step published
    last_success_timestamp_seconds     gauge      Unix time of the last published step
    acc{policy} / bwt{policy}          gauge      ACC / BWT of the current deploy version (SPEC §5)
    evaluations_total{outcome}         counter    ok | failed evaluation attempts
    deploy_held_back{policy}           gauge      published deploy versions the gate holds back now
    gate_held_back_total               counter    versions the deploy gate held back
    job_failures_total{job}            counter    exceptions raised by a scheduler job
    engine_tasks_total{work}           counter    tasks a distributed backend ran (work: step | prepare)
    engine_task_retries_total{work}    counter    task attempts run again after a worker or node died
    engine_task_duration_seconds{work} histogram  one task of a distributed backend, in its worker
    build_info{version, policy}        info       constant 1
    process_*                          (namespaced mergewatch_process_*) CPU, memory, fds of the process
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server

from mergewatch import __version__
from mergewatch.errors import REJECT_CLASSES
from mergewatch.views import VIEWS

NAMESPACE = "mergewatch"
DEFAULT_LISTEN = "127.0.0.1:9464"

OUTCOMES = ("merged", "rejected", "duplicate")
EVAL_OUTCOMES = ("ok", "failed")
ENGINE_WORK = ("step", "prepare")
DEFAULT_JOBS = ("rescan", "retention", "heartbeat", "evaluate")

#: Buckets spanning a fraction of a second (a tiny test model) to hours (a large model on a CPU).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
#: The drop -> publish latency also includes time spent queued behind other experts.
LATENCY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400, float("inf"))

__all__ = ["Metrics", "MetricsServer", "parse_listen", "CONTENT_TYPE_LATEST", "DEFAULT_LISTEN", "OUTCOMES", "VIEWS", "DEFAULT_JOBS"]


def engine_event(report: dict) -> dict:
    """A step's engine report for its log event: counts and the slowest and mean task, not every
    task's duration (those go to ``engine_task_duration_seconds``)."""
    return {k: v for k, v in report.items() if k != "task_seconds"}


def _check(kind: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        # A silent new label value would be an unbounded series in the making: refuse it loudly.
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


class Metrics:
    """The daemon's metrics; thread-safe (prometheus_client locks each value)."""

    def __init__(
        self,
        *,
        policy: str = "",
        version: str = __version__,
        jobs: Iterable[str] = DEFAULT_JOBS,
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.policy = policy
        self.jobs = tuple(jobs)
        r, ns = self.registry, NAMESPACE

        self.queue_depth = Gauge("queue_depth", "Drops claimed and waiting for the merge worker.", namespace=ns, registry=r)
        self.experts_total = Counter(
            "experts", "Experts processed, by outcome (reason: the class of a rejection, empty otherwise).", ["outcome", "reason"],
            namespace=ns, registry=r
        )
        self.step = Gauge("step", "Index of the last committed strategy step.", namespace=ns, registry=r)
        self.current_version = Gauge(
            "current_version", "Version the view's current pointer names (0 = nothing published).", ["view"],
            namespace=ns, registry=r,
        )
        self.latest_version = Gauge(
            "latest_version", "Newest published version of the view (ahead of current_version while a deploy gate holds it back).",
            ["view"], namespace=ns, registry=r,
        )
        self.merge_duration_seconds = Histogram(
            "merge_duration_seconds", "Duration of one strategy step.", namespace=ns, registry=r, buckets=DURATION_BUCKETS
        )
        self.publish_duration_seconds = Histogram(
            "publish_duration_seconds", "Duration of publishing one step (both views).", namespace=ns, registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.evaluate_duration_seconds = Histogram(
            "evaluate_duration_seconds", "Duration of one evaluation of a published version.", namespace=ns, registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.prepare_duration_seconds = Histogram(
            "prepare_duration_seconds", "Duration of preparing the next step ahead (e.g. OPCM's SVDs), run when idle after a publish.",
            namespace=ns, registry=r, buckets=DURATION_BUCKETS,
        )
        self.drop_to_publish_seconds = Histogram(
            "drop_to_publish_seconds", "Latency from a drop first being seen in the inbox (a copied drop's quiet period included) to its step being published.",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS,
        )
        self.last_success_timestamp_seconds = Gauge(
            "last_success_timestamp_seconds", "Unix time of the last successfully published step (0 = none yet).",
            namespace=ns, registry=r,
        )
        self.acc = Gauge("acc", "Average accuracy (ACC) of the latest evaluation.", ["policy"], namespace=ns, registry=r)
        self.bwt = Gauge("bwt", "Backward transfer (BWT) of the latest evaluation.", ["policy"], namespace=ns, registry=r)
        self.evaluations_total = Counter(
            "evaluations", "Evaluation attempts of published versions, by outcome.", ["outcome"], namespace=ns, registry=r
        )
        self.deploy_held_back = Gauge(
            "deploy_held_back", "Published deploy versions the deploy gate currently holds back.", ["policy"], namespace=ns, registry=r
        )
        self.gate_held_back_total = Counter(
            "gate_held_back", "Deploy versions held back by the deploy gate.", namespace=ns, registry=r
        )
        self.job_failures_total = Counter(
            "job_failures", "Exceptions raised by scheduled housekeeping jobs.", ["job"], namespace=ns, registry=r
        )
        self.engine_tasks_total = Counter(
            "engine_tasks", "Tasks run by a distributed engine backend ([engine] backend = ray).", ["work"], namespace=ns, registry=r
        )
        self.engine_task_retries_total = Counter(
            "engine_task_retries", "Engine tasks run again after their worker or node died.", ["work"], namespace=ns, registry=r
        )
        self.engine_task_duration_seconds = Histogram(
            "engine_task_duration_seconds", "Duration of one engine task in its worker.", ["work"], namespace=ns, registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.build = Info("build", "Build and configuration of this daemon.", namespace=ns, registry=r)
        self.build.info({"version": version, "policy": policy})
        if process_metrics:
            ProcessCollector(namespace=ns, registry=r)

        for outcome in OUTCOMES:
            for reason in REJECT_CLASSES if outcome == "rejected" else ("",):
                self.experts_total.labels(outcome=outcome, reason=reason)
        for view in VIEWS:
            self.current_version.labels(view=view)
            self.latest_version.labels(view=view)
        for job in self.jobs:
            self.job_failures_total.labels(job=job)
        for outcome in EVAL_OUTCOMES:
            self.evaluations_total.labels(outcome=outcome)
        for work in ENGINE_WORK:
            self.engine_tasks_total.labels(work=work)
            self.engine_task_retries_total.labels(work=work)
            self.engine_task_duration_seconds.labels(work=work)
        self.deploy_held_back.labels(policy=policy)
        # ACC/BWT exist only once something was evaluated: a 0 would read as "accuracy dropped to 0".

    # Updates ----------------------------------------------------------------------------------

    def set_queue(self, n: int) -> None:
        self.queue_depth.set(n)

    def count_expert(self, outcome: str, reason: str = "") -> None:
        if (outcome == "rejected") != bool(reason):
            raise ValueError(f"a rejection needs a reason class and only a rejection has one (got {outcome!r}, {reason!r})")
        self.experts_total.labels(outcome=_check("outcome", outcome, OUTCOMES), reason=_check("reason", reason, ("", *REJECT_CLASSES))).inc()

    def set_step(self, step: int) -> None:
        self.step.set(step)

    def set_version(self, view: str, current: int, latest: int | None = None) -> None:
        """Record the view's current version (and its newest published one, default: the same)."""
        _check("view", view, VIEWS)
        self.current_version.labels(view=view).set(current)
        self.latest_version.labels(view=view).set(current if latest is None else latest)

    def observe_merge(self, seconds: float) -> None:
        self.merge_duration_seconds.observe(seconds)

    def observe_publish(self, seconds: float) -> None:
        self.publish_duration_seconds.observe(seconds)

    def observe_evaluate(self, seconds: float) -> None:
        self.evaluate_duration_seconds.observe(seconds)

    def observe_prepare(self, seconds: float) -> None:
        self.prepare_duration_seconds.observe(seconds)

    def observe_engine(self, work: str, report: dict) -> None:
        """A step's or prepare's engine report (``engine.steps.StepResult.engine``): nothing for the
        local backend."""
        _check("work", work, ENGINE_WORK)
        self.engine_tasks_total.labels(work=work).inc(report.get("tasks", 0))
        self.engine_task_retries_total.labels(work=work).inc(report.get("retries", 0))
        for seconds in report.get("task_seconds", ()):
            self.engine_task_duration_seconds.labels(work=work).observe(seconds)

    def observe_drop_to_publish(self, seconds: float) -> None:
        self.drop_to_publish_seconds.observe(seconds)

    def mark_success(self, timestamp: float | None = None) -> None:
        self.last_success_timestamp_seconds.set(time.time() if timestamp is None else timestamp)

    def set_eval(self, *, acc: float | None = None, bwt: float | None = None, policy: str | None = None) -> None:
        """Record the latest ACC/BWT; ``policy`` defaults to the daemon's configured policy name."""
        name = self.policy if policy is None else policy
        if acc is not None:
            self.acc.labels(policy=name).set(acc)
        if bwt is not None:
            self.bwt.labels(policy=name).set(bwt)

    def count_evaluation(self, outcome: str) -> None:
        self.evaluations_total.labels(outcome=_check("outcome", outcome, EVAL_OUTCOMES)).inc()

    def count_held_back(self) -> None:
        self.gate_held_back_total.inc()

    def set_held_back(self, n: int) -> None:
        self.deploy_held_back.labels(policy=self.policy).set(n)

    def count_job_failure(self, job: str) -> None:
        self.job_failures_total.labels(job=_check("job", job, self.jobs)).inc()

    def check_job(self, job: str) -> str:
        """Raise ``ValueError`` unless ``job`` is one of the names given at construction."""
        return _check("job", job, self.jobs)

    @contextlib.contextmanager
    def timed(self, histogram: Histogram) -> Iterator[None]:
        """``with m.timed(m.merge_duration_seconds): ...`` observes the block's wall time, also on error."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - t0)

    # Exposition -------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, listen: str = DEFAULT_LISTEN) -> MetricsServer:
        """Serve the registry over HTTP on ``HOST:PORT`` from a daemon thread (port 0 picks a free port)."""
        host, port = parse_listen(listen)
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(host=host, port=httpd.server_port, _httpd=httpd, _thread=thread)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` / ``"localhost:0"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host, int(port)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful when asked for port 0)."""

    host: str
    port: int
    _httpd: object = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
