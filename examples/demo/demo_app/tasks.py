"""A small shop's background work, written the way a kubeque user writes it.

``queue`` is the QueueManager; each handler is a plain function:

- ``make_thumbnail``: opens an image with Pillow, writes a small PNG thumbnail.
- ``send_email``: delivers a message over SMTP; a 4xx answer (greylisting) raises, so kubeque retries it.
- ``verify_address``: an async SMTP probe (EHLO, MAIL, RCPT, QUIT); a server that never answers makes it
  run past its deadline, and kubeque cancels it.
- ``write_report``: aggregates what has been produced so far into a JSON file.

No store is configured here: ``kubeque worker --app demo_app.tasks:queue --dsn ...`` and the demo runner
both point ``queue`` at PostgreSQL. Where to write and which SMTP port to use come from the environment
(``KUBEQUE_DEMO_OUTPUT``, ``KUBEQUE_DEMO_SMTP_PORT``), read when a task runs, so importing this module needs
neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from kubeque import QueueManager, Task

# Short backoff so that retries settle within the demo's few seconds.
queue = QueueManager(name="demo", max_retries=3, retry_backoff_ms=200, poll_interval=0.5)

SMTP_HOST = "127.0.0.1"
SENDER = "shop@kubeque.example"


def output_dir() -> Path:
    """The folder this run writes into (thumbs/, reports/; the SMTP server fills mail/)."""
    value = os.environ.get("KUBEQUE_DEMO_OUTPUT")
    if not value:
        raise RuntimeError("KUBEQUE_DEMO_OUTPUT is not set: run this app through `kubeque demo`")
    return Path(value)


def smtp_port() -> int:
    """The port of the SMTP server that delivers this run's mail."""
    value = os.environ.get("KUBEQUE_DEMO_SMTP_PORT")
    if not value:
        raise RuntimeError("KUBEQUE_DEMO_SMTP_PORT is not set: run this app through `kubeque demo`")
    return int(value)


# --- thumbnails ----------------------------------------------------------------


class Thumbnail(BaseModel):
    """Make a ``size`` x ``size`` (at most) thumbnail of the image at ``source``."""

    source: str
    size: int = Field(default=64, ge=8, le=1024)


@queue.handler("make_thumbnail", max_processing_time=30_000)
def make_thumbnail(job: Thumbnail, task: Task) -> dict[str, Any]:
    target_dir = output_dir() / "thumbs"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{task.id}.png"
    partial = target_dir / f"{task.id}.part"
    with Image.open(job.source) as original:  # a file that is not an image raises here, every time
        image = original.convert("RGB")
    image.thumbnail((job.size, job.size))
    image.save(partial, "PNG")
    # Renamed into place so that a report never counts a half-written file.
    partial.replace(target)
    return {"path": str(target), "bytes": target.stat().st_size, "width": image.width, "height": image.height}


# --- email -----------------------------------------------------------------------


class Email(BaseModel):
    """One message to one recipient."""

    to: str
    subject: str
    body: str


@queue.handler("send_email", max_processing_time=30_000)
def send_email(mail: Email, task: Task) -> dict[str, Any]:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = mail.to
    message["Subject"] = mail.subject
    # One Message-ID per task: a retried delivery is the same message, not a second one.
    message["Message-ID"] = f"<{task.id}@kubeque.example>"
    message.set_content(mail.body)
    with smtplib.SMTP(SMTP_HOST, smtp_port(), timeout=10) as smtp:
        smtp.send_message(message)  # a 4xx answer raises SMTPRecipientsRefused: kubeque retries the task
    return {"to": mail.to, "message_id": message["Message-ID"]}


class AddressCheck(BaseModel):
    """Ask the mail server whether it would accept mail for ``address``."""

    address: str


@queue.handler("verify_address", max_processing_time=2_000, max_retries=0)
async def verify_address(check: AddressCheck) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(SMTP_HOST, smtp_port())
    try:
        await _expect(reader, "220")
        for command in ("EHLO kubeque.example", f"MAIL FROM:<{SENDER}>"):
            writer.write(f"{command}\r\n".encode())
            await _expect(reader, "250")
        writer.write(f"RCPT TO:<{check.address}>\r\n".encode())
        reply = await _reply(reader)  # a server that stalls here is what max_processing_time is for
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return {"address": check.address, "deliverable": reply.startswith("2"), "reply": reply}
    finally:
        writer.close()


async def _reply(reader: asyncio.StreamReader) -> str:
    """One SMTP reply, joining the lines of a multi-line one ("250-...", "250 ...")."""
    lines = []
    while True:
        line = (await reader.readline()).decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            raise ConnectionError("the SMTP server closed the connection")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return " | ".join(lines)


async def _expect(reader: asyncio.StreamReader, code: str) -> None:
    reply = await _reply(reader)
    if not reply.startswith(code):
        raise ConnectionError(f"SMTP server answered {reply!r}, expected {code}")


# --- reports ---------------------------------------------------------------------


class Report(BaseModel):
    """Summarise the work done so far under ``name``."""

    name: str = Field(pattern=r"^[a-z0-9-]{1,64}$")


@queue.handler("write_report", max_processing_time=30_000)
def write_report(report: Report) -> dict[str, Any]:
    out = output_dir()
    thumbs = [p.stat().st_size for p in (out / "thumbs").glob("*.png")]
    summary = {
        "report": report.name,
        "written_at": datetime.now(UTC).isoformat(),
        "thumbnails": len(thumbs),
        "thumbnail_bytes": sum(thumbs),
        "emails_delivered": sum(1 for _ in (out / "mail").glob("*.eml")),
    }
    target_dir = out / "reports"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{report.name}.json"
    partial = target_dir / f"{report.name}.part"
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    partial.replace(target)
    return {"path": str(target), **{k: v for k, v in summary.items() if k != "written_at"}}
