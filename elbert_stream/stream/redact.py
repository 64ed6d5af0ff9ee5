"""Keep secrets out of kafka-python's log records.

With DEBUG logging on, kafka-python 3 writes secrets in clear: ``KafkaAdminClient`` logs its whole
configuration (SASL and key passwords), and the connection and protocol loggers log every request,
SASL PLAIN's ``SaslAuthenticate`` bytes (``user\\0user\\0password``) included. Settings keep secrets as
``SecretStr``; ``client_config`` registers each one here when it hands it to kafka-python, and a log
record factory rewrites any ``kafka.*`` record that contains one (as text or as it appears inside a
``bytes`` repr) to ``**********``. Records of other loggers are left alone (elbert-stream never logs
a secret: tests/integration/test_secured.py checks the logs of a secured run).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

MASK = "**********"
_secrets: set[str] = set()
_lock = threading.Lock()
_previous_factory: Any = None


def register_secrets(*values: str | None) -> None:
    """Redact ``values`` (None and empty ones are ignored) from kafka-python's log records from now on."""
    forms = set()
    for v in values:
        if v:
            forms |= {v, repr(v.encode())[2:-1], repr(v)[1:-1]}
    if not forms:
        return
    global _previous_factory
    with _lock:
        _secrets.update(f for f in forms if len(f) >= 4)  # never mask every "a" for a 1-char secret
        if _previous_factory is None:
            _previous_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_factory)


def redact(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _previous_factory(*args, **kwargs)
    if record.name.startswith("kafka") and _secrets:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not ours
            return record
        if any(s in message for s in _secrets):
            record.msg, record.args = redact(message), None
    return record
