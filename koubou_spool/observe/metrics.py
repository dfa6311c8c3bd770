"""Prometheus text exposition (format 0.0.4) of the spool's figures, for node_exporter. No I/O.

Counters are all-time totals from the ledger's tasks table, so they only go up (a `koubou
maintain` purge removes outcome files, not ledger rows); gauges are taken at the time of writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PREFIX = "koubou"


@dataclass
class Family:
    """One metric: its name, type, help text and samples (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        """Add one sample."""
        self.samples.append((labels, value))


def escape(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(families: list[Family]) -> str:
    """The exposition text of metric families."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            shown = ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{family.name}{{{shown}}} {_number(value)}" if shown
                         else f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def families(queues: dict[str, int], in_flight: dict[str, int], totals: list[dict[str, Any]],
             budget: dict[str, Any], workers: list[dict[str, Any]],
             endpoints: list[dict[str, Any]] = ()) -> list[Family]:
    """Metric families from the figures gathered by observe.py."""
    queue = Family(f"{PREFIX}_queue_depth", "gauge", "Tasks in each spool state directory.")
    for state, count in queues.items():
        queue.add(count, state=state)
    flight = Family(f"{PREFIX}_in_flight", "gauge", "Tasks claimed right now, per craftsman.")
    for craftsman, count in in_flight.items():
        flight.add(count, craftsman=craftsman)
    return [queue, flight, *_counters(totals), _budget(budget), *_workers(workers),
            *_endpoints(endpoints)]


def _endpoints(endpoints: list[dict[str, Any]]) -> list[Family]:
    """Per endpoint of a craftsman with several: the live workers' figures (the counters start
    again with each worker, which Prometheus' rate() takes as a reset)."""
    if not endpoints:
        return []
    found = [Family(f"{PREFIX}_endpoint_requests_total", "counter",
                    "Requests sent to each endpoint by the live workers."),
             Family(f"{PREFIX}_endpoint_failures_total", "counter",
                    "Connection errors, timeouts, 5xx and 429 at each endpoint (live workers)."),
             Family(f"{PREFIX}_endpoint_in_flight", "gauge",
                    "Requests at each endpoint at the workers' last heartbeats."),
             Family(f"{PREFIX}_endpoint_cooling", "gauge",
                    "1 while the endpoint rests after a failure (no traffic until a probe).")]
    for row in endpoints:
        labels = {"craftsman": row["craftsman"], "endpoint": row["endpoint"]}
        for family, value in zip(found, (row["requests"], row["failures"], row["in_flight"],
                                         1 if row["cooling"] else 0), strict=True):
            family.add(value, **labels)
    return found


def _counters(totals: list[dict[str, Any]]) -> list[Family]:
    tasks = Family(f"{PREFIX}_tasks_total", "counter",
                   "Finished tasks by craftsman, model and outcome.")
    tokens = Family(f"{PREFIX}_tokens_total", "counter",
                    "Tokens of finished tasks by craftsman, model, outcome and direction.")
    cost = Family(f"{PREFIX}_cost_usd_total", "counter",
                  "Cost in US dollars of finished tasks by craftsman, model and outcome.")
    for row in totals:
        labels = {"craftsman": row["craftsman"], "model": row["model"], "outcome": row["outcome"]}
        tasks.add(row["tasks"], **labels)
        tokens.add(row["prompt_tokens"], **labels, direction="in")
        tokens.add(row["completion_tokens"], **labels, direction="out")
        cost.add(row["cost_usd"], **labels)
    return [tasks, tokens, cost]


def _budget(budget: dict[str, Any]) -> Family:
    left = Family(f"{PREFIX}_budget_remaining_usd", "gauge",
                  "Budget left in the current day and month (absent when not configured).")
    for period in ("daily", "monthly"):
        line = budget.get(period) or {}
        if line.get("left_usd") is not None:
            left.add(line["left_usd"], period=period)
    return left


def _workers(workers: list[dict[str, Any]]) -> list[Family]:
    age = Family(f"{PREFIX}_worker_heartbeat_age_seconds", "gauge",
                 "Seconds since each worker's last heartbeat in the ledger.")
    up = Family(f"{PREFIX}_worker_alive", "gauge",
                "1 when the worker holds its lock and beats within its lease, else 0.")
    held = Family(f"{PREFIX}_cluster_slots_held", "gauge",
                  "Slots of a server the cluster's hosts share that each worker held at its last "
                  "heartbeat, in use by a request or spare.")
    for worker in workers:
        if worker.get("heartbeat_age_s") is not None:
            age.add(worker["heartbeat_age_s"], worker=worker["id"])
        up.add(1 if worker.get("liveness") == "alive" else 0, worker=worker["id"])
        for shared in worker.get("cluster_slots") or ():
            for use in ("in_use", "spare"):
                held.add(shared[use], worker=worker["id"], craftsman=shared["craftsman"],
                         server=shared["server"], use=use)
    return [age, up, held] if held.samples else [age, up]


def cluster_families(hosts: list[dict[str, Any]] | None) -> list[Family]:
    """The cluster's hosts as each one's bridge last wrote its row (observe/cluster_view.py:
    hosts): their queues, live workers, the row's age and whether it is stale; None when the
    cluster's database could not be read (then `koubou_cluster_reachable` is 0, the rest
    absent)."""
    reachable = Family(f"{PREFIX}_cluster_reachable", "gauge",
                       "1 when this host read the cluster's PostgreSQL for these figures.")
    reachable.add(0 if hosts is None else 1)
    if hosts is None:
        return [reachable]
    tasks = Family(f"{PREFIX}_cluster_host_queue_depth", "gauge",
                   "Tasks in each spool state directory of each host, at its bridge's last "
                   "heartbeat.")
    workers = Family(f"{PREFIX}_cluster_host_workers", "gauge",
                     "Live worker and bridge processes of each host, at its last heartbeat.")
    age = Family(f"{PREFIX}_cluster_host_age_seconds", "gauge",
                 "Seconds since each host's bridge last wrote its row.")
    stale = Family(f"{PREFIX}_cluster_host_stale", "gauge",
                   "1 when a host's row is older than its cluster.lease_s: nothing is known "
                   "of it since, and its leases are taken over.")
    for host in hosts:
        name = str(host["host"])
        for state, count in sorted((host.get("queues") or {}).items()):
            tasks.add(count, host=name, state=str(state))
        workers.add(sum(w.get("liveness") == "alive" for w in host.get("workers") or ()),
                    host=name)
        age.add(host["age_s"], host=name)
        stale.add(1 if host["stale"] else 0, host=name)
    return [reachable, tasks, workers, age, stale]
