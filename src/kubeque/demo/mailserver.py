"""The demo's local SMTP server: stores each message as a file, greylists some senders, stalls on one domain.

Greylisting is what real mail servers do to strangers: the first attempt for an
address is answered ``451`` (try again later), a later one is accepted. Mail to
the tarpit domain gets no answer at all to ``RCPT``, which is how the demo's
hung task hangs on real I/O.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from .ports import free_port

GREYLIST_DOMAIN = "greylist.example"
TARPIT_DOMAIN = "tarpit.invalid"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def mailbox_file(mailbox: Path, message_id: str) -> Path:
    """Where the server stores the message with this Message-ID."""
    local = message_id.strip().strip("<>").split("@", 1)[0]
    return mailbox / f"{_SAFE_NAME.sub('_', local) or 'message'}.eml"


class MailHandler:
    """aiosmtpd handler: the greylist, the tarpit and the mailbox."""

    def __init__(self, mailbox: Path) -> None:
        self.mailbox = mailbox
        self.delivered = 0
        self.deferred = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    async def handle_RCPT(  # aiosmtpd calls handle_<VERB>
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain == TARPIT_DOMAIN:
            await asyncio.Event().wait()  # never answers; cancelled when the client goes away
        if domain == GREYLIST_DOMAIN:
            with self._lock:
                first_time = address not in self._seen
                self._seen.add(address)
                if first_time:
                    self.deferred += 1
            if first_time:
                return "451 4.7.1 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        headers = BytesHeaderParser().parsebytes(content)
        message_id = headers.get("Message-ID") or f"<unnamed-{id(envelope)}@local>"
        target = mailbox_file(self.mailbox, message_id)
        partial = target.with_suffix(".part")
        partial.write_bytes(content)
        partial.replace(target)  # the file is whole before the client hears 250
        with self._lock:
            self.delivered += 1
        return "250 Message accepted for delivery"


class MailServer:
    """An SMTP server on 127.0.0.1 in a thread of this process."""

    def __init__(self, mailbox: Path, port: int | None = None) -> None:
        self.mailbox = mailbox
        self.port = port or free_port()
        self.handler = MailHandler(mailbox)
        self._controller: Any = None

    def start(self) -> int:
        """Start listening; return the port."""
        from aiosmtpd.controller import Controller

        # aiosmtpd logs every session at INFO; the demo has its own display.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self.mailbox.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10)
        self._controller.start()
        return self.port

    def stop(self) -> None:
        """Stop the server (safe to call twice)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
