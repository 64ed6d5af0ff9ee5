"""One root exception for everything elbert-stream raises on purpose."""

from __future__ import annotations


class ElbertError(Exception):
    """Root of all elbert-stream errors."""


class ConfigError(ElbertError):
    """A setting or a model directory is wrong; the message quotes the bad value."""


class ModelLoadError(ConfigError):
    """A checkpoint directory cannot be loaded as an ALBERT/ELBERT model."""


class BadMessage(ElbertError):
    """One input message cannot be processed. A per-message outcome: it becomes a dead letter.

    ``reason`` is a short machine-readable code (e.g. ``not_utf8``, ``empty``, ``too_large``);
    ``detail`` is a human-readable explanation that quotes the offending value where safe.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class EngineFailure(ElbertError):
    """The engine or worker cannot go on; the replica's health check fails and Serve replaces it."""
