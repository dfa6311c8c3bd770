"""A claimer in a process of its own, for the fault tests: it claims one task of a craftsman,
says so on stdout (`claimed ID ATTEMPT`), then waits for a line on stdin and publishes its
outcome (`published True|False`). Killed or stopped in between, it is a dead or frozen worker.

    python3 tests/cluster_claimer.py DSN HOST WORKER_ID CRAFTSMAN LEASE_S
"""

from __future__ import annotations

import sys

from koubou_spool.spool import cluster


def main(dsn: str, host: str, worker_id: str, craftsman: str, lease_s: str) -> int:
    store = cluster.Cluster(dsn, host=host, lease_s=float(lease_s))
    claim = store.claim(worker_id, [craftsman])
    if claim is None:
        print("nothing", flush=True)
        return 1
    print(f"claimed {claim.task_id} {claim.attempt}", flush=True)
    sys.stdin.readline()
    record = {"id": claim.task_id, "status": "completed", "result": {"worker_id": worker_id}}
    print(f"published {store.publish(claim, record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
