"""Errors raised by the sensors: one type for "this backend cannot run here"."""

from __future__ import annotations

from agent.errors import ExecguardError


class SensorUnavailable(ExecguardError):
    """A backend cannot start on this host: what failed, why, and what to do about it.

    Raised at the seam where a third-party engine (BCC) is called, so nothing above it
    ever sees a bare ``Exception`` from libbcc.
    """

    def __init__(self, backend: str, cause: str, hint: str | None = None) -> None:
        super().__init__(f"{backend}: {cause}")
        self.backend = backend
        self.cause = cause
        self.hint = hint

    def diagnostics(self) -> str:
        text = f"backend {self.backend} is unavailable: {self.cause}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class SensorMapError(ExecguardError):
    """Writing a kernel map failed (the map is full, or the sensor is closed)."""

    def __init__(self, backend: str, operation: str, cause: str) -> None:
        super().__init__(f"{backend}: {operation} failed: {cause}")
        self.backend = backend
        self.operation = operation
        self.cause = cause
