"""execguard: let a Go binary run only when a signature the host trusts covers it."""

__version__ = "0.1.0"
