"""The python-dirq peer: a QueueSimple consumer loop, as its docs show, repeated on a timer.

The docs show one pass (iterate, lock, get, remove); a daemon repeats it, sleeping between
passes that found nothing. POLL_S is our choice (the docs give none): 0.1 s, like Huey's
first polling delay.

    python dirq_consumer.py QUEUE_DIR LOG
"""

from __future__ import annotations

import os
import sys
import time

from dirq.QueueSimple import QueueSimple

POLL_S = 0.1


def consume_once(queue: QueueSimple, log_fd: int) -> int:
    """One pass over the queue; returns how many elements it ran."""
    ran = 0
    for name in queue:
        if not queue.lock(name):
            continue
        task_id = queue.get(name).decode()
        os.write(log_fd, f"{task_id}\n".encode())  # the result, and the execution record
        queue.remove(name)
        ran += 1
    return ran


def main() -> None:
    """Consume forever (until killed)."""
    queue = QueueSimple(sys.argv[1])
    log_fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while True:
        if not consume_once(queue, log_fd):
            time.sleep(POLL_S)


if __name__ == "__main__":
    main()
