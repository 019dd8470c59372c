"""Running under systemd: the sd_notify protocol, event-loop heartbeats, and the watchdog
that pings only while decisions flow (docs/service.md)."""
