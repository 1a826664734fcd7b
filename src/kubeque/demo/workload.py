"""The demo's mix of tasks: what is added, in which order, at which priority.

Each task carries its ``kind`` as an extra field, so the summary can tell the
urgent emails from the ordinary ones and find the poison and hung tasks.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mailserver import GREYLIST_DOMAIN, TARPIT_DOMAIN

URGENT_PRIORITY = 10
NORMAL_PRIORITY = 0
REPORT_PRIORITY = -5
MIN_TASKS = 20
POISON_MAX_RETRIES = 2

# kind -> what the summary calls it
KINDS = {
    "thumbnail": "thumbnails",
    "email": "emails",
    "urgent_email": "urgent emails (added last)",
    "address_check": "address checks",
    "report": "reports",
    "poison": "poison task (corrupt upload)",
    "hung": "hung task (stalled mail server)",
}
# kind -> its name in a list
KINDS_SHORT = {
    "thumbnail": "thumbnails",
    "email": "emails",
    "urgent_email": "urgent emails",
    "address_check": "checks",
    "report": "reports",
    "poison": "poison",
    "hung": "hung",
}
_NAMES = ["ada", "grace", "alan", "edsger", "barbara", "ken", "dennis", "margaret", "linus", "guido", "radia", "leslie"]
_SUBJECTS = ["Your order has shipped", "Your invoice", "Thanks for your review", "Your basket misses you"]


@dataclass(frozen=True)
class Workload:
    """The task specs for ``QueueManager.add_tasks``, in the order they are added."""

    specs: list[dict[str, Any]]
    poison_id: str
    hung_id: str
    counts: dict[str, int] = field(default_factory=dict)

    def batches(self, size: int) -> list[list[dict[str, Any]]]:
        return [self.specs[i : i + size] for i in range(0, len(self.specs), size)]


def plan_workload(
    total: int, sources: list[Path], corrupt_source: Path, *, thumb_size: int = 64, seed: int = 1
) -> Workload:
    """``total`` tasks: thumbnails and emails (some greylisted), a few address checks, low-priority
    reports spread through the backlog, one poison and one hung task first, urgent emails last."""
    if total < MIN_TASKS:
        raise ValueError(f"the demo needs at least {MIN_TASKS} tasks, not {total}")
    if not sources:
        raise ValueError("no source images")
    rng = random.Random(seed)
    urgent = max(2, total * 5 // 100)
    reports = max(1, total // 100)
    checks = max(1, total // 100)
    rest = total - 2 - urgent - reports - checks
    thumbs = rest * 6 // 10
    emails = rest - thumbs

    backlog: list[dict[str, Any]] = []
    for i in range(thumbs):
        source = sources[i % len(sources)]
        backlog.append(_task("thumbnail", "make_thumbnail", {"source": str(source), "size": thumb_size}))
    for i in range(emails):
        name = _NAMES[i % len(_NAMES)]
        # Every fifth recipient sits behind greylisting: its first delivery is refused with 451.
        domain = GREYLIST_DOMAIN if i % 5 == 4 else "customers.example"
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        body = f"Hi {name.title()},\n\n{subject} (reference {i + 1:05d}).\n\n-- the kubeque demo shop\n"
        mail = {"to": f"{name}.{i}@{domain}", "subject": subject, "body": body}
        backlog.append(_task("email", "send_email", mail))
    for i in range(checks):
        address = f"{_NAMES[i % len(_NAMES)]}.{i}@customers.example"
        backlog.append(_task("address_check", "verify_address", {"address": address}))
    rng.shuffle(backlog)
    # Reports are spread through the backlog but wait behind it: low priority.
    step = max(1, len(backlog) // reports)
    for r in range(reports):
        report = _task("report", "write_report", {"name": f"report-{r + 1:03d}"}, priority=REPORT_PRIORITY)
        backlog.insert(min(len(backlog), (r + 1) * step + r), report)

    poison_id = f"poison-{uuid.uuid4().hex[:12]}"
    hung_id = f"hung-{uuid.uuid4().hex[:12]}"
    # First in, so their retries and deadline overlap the backlog instead of trailing it.
    poison = _task(
        "poison",
        "make_thumbnail",
        {"source": str(corrupt_source), "size": thumb_size},
        id=poison_id,
        max_retries=POISON_MAX_RETRIES,
    )
    hung = _task("hung", "verify_address", {"address": f"postmaster@{TARPIT_DOMAIN}"}, id=hung_id, max_retries=0)
    # First in, so their retries and deadline overlap the backlog instead of trailing it.
    front = [poison, hung]
    last = []
    for i in range(urgent):
        code = f"{rng.randrange(10**6):06d}"
        mail = {
            "to": f"{_NAMES[i % len(_NAMES)]}.urgent{i}@customers.example",
            "subject": "Your password reset code",
            "body": f"Your one-time code is {code}. It expires in 10 minutes.\n",
        }
        last.append(_task("urgent_email", "send_email", mail, priority=URGENT_PRIORITY))
    specs = front + backlog + last
    counts = dict(Counter(s["kind"] for s in specs))
    return Workload(specs=specs, poison_id=poison_id, hung_id=hung_id, counts=counts)


def _task(kind: str, handler: str, payload: dict[str, Any], **options: Any) -> dict[str, Any]:
    # "kind" is not an add_task option, so kubeque stores it as an extra field of the task.
    return {"handler": handler, "payload": payload, "kind": kind, **options}
