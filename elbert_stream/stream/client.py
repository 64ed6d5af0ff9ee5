"""Kafka client construction shared by the source, the sinks, the admin tools and the CLI.

``client_config`` turns ``KafkaSettings`` into kafka-python's connection and security options (and
registers the secrets with ``redact``); ``explain_bootstrap`` turns kafka-python's bare "Unable to
bootstrap" into ``KafkaUnreachable`` naming the servers, the security settings and the refusal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from kafka import errors as kerrors

from elbert_stream.config import KafkaSettings
from elbert_stream.errors import ElbertError
from elbert_stream.stream.redact import register_secrets


def client_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by consumer, producer and admin clients. The secrets in
    it are registered with ``redact`` (kafka-python logs them at DEBUG)."""
    register_secrets(*(s.get_secret_value() for s in (k.sasl_password, k.ssl_password) if s is not None))
    cfg: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers.split(","),
                           "bootstrap_timeout_ms": k.bootstrap_timeout_ms,
                           "security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        cfg.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                   sasl_plain_password=k.sasl_password.get_secret_value() if k.sasl_password else None)
    if k.security_protocol in ("SSL", "SASL_SSL"):
        cfg.update(ssl_cafile=k.ssl_cafile, ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile,
                   ssl_password=k.ssl_password.get_secret_value() if k.ssl_password else None,
                   ssl_check_hostname=k.ssl_check_hostname)
    return cfg


# what KafkaUnreachable reports of the client's settings (the secrets are never among them)
SHOWN_SECURITY_SETTINGS = {"security_protocol", "sasl_mechanism", "sasl_username", "ssl_cafile",
                           "ssl_certfile"}


class KafkaUnreachable(ElbertError):
    """No Kafka client could bootstrap: wrong address, credentials, CA or protocol (the message says
    which settings were used and the last refusal kafka-python logged)."""


class _Refusals(logging.Handler):
    """Collects the distinct causes of the "Bootstrap connection to X failed: <cause> (backoff ...)"
    warnings kafka-python logs while a client bootstraps."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.causes: dict[str, None] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Bootstrap connection") and "failed: " in message:
            self.causes[message.split("failed: ", 1)[1].rsplit(" (backoff", 1)[0]] = None


@contextlib.contextmanager
def explain_bootstrap(k: KafkaSettings, what: str) -> Iterator[None]:
    """Turn kafka-python's bare "Unable to bootstrap" into an error that names the bootstrap servers,
    the security settings (never a secret) and the cause of the last refused connection (e.g.
    ``SaslAuthenticationFailedError``), so a misconfigured replica fails with a readable reason."""
    refusals = _Refusals()
    logger = logging.getLogger("kafka.net.manager")
    logger.addHandler(refusals)
    try:
        yield
    except kerrors.KafkaTimeoutError as e:
        shown = k.model_dump(include=SHOWN_SECURITY_SETTINGS, exclude_none=True)
        used = ", ".join(f"{name}={shown[name]}" for name in sorted(shown))
        raise KafkaUnreachable(f"the {what} could not connect to Kafka at {k.bootstrap_servers} ({used}): "
                               f"{e}; refused with: {'; '.join(refusals.causes) or 'nothing logged'}") from e
    finally:
        logger.removeHandler(refusals)
