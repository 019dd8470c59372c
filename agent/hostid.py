"""Which host this is: the kernel's hostname and /etc/machine-id. Break-glass tokens are bound
to the pair (``breakglass host-id`` prints it), and every decision record names it, so records
collected from a fleet say which host wrote them."""

from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, Optional

from agent.errors import InputError, MalformedInput

MACHINE_ID_PATH = "/etc/machine-id"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"  # new at every boot: which run of the host
_MACHINE_ID = re.compile(r"[0-9a-f]{32}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")


@dataclass(frozen=True)
class HostId:
    """Hostname and machine-id; ``text()`` is what ``breakglass host-id`` prints."""

    hostname: str
    machine_id: str

    def text(self) -> str:
        return f"{self.hostname}:{self.machine_id}"

    def to_json(self) -> Dict[str, str]:
        return {"hostname": self.hostname, "machine_id": self.machine_id}

    @classmethod
    def parse(cls, text: str, source: str = "--host") -> HostId:
        """``HOSTNAME:MACHINE-ID`` (hostnames never contain a colon)."""
        hostname, sep, machine_id = text.strip().rpartition(":")
        if not sep:
            raise MalformedInput(source, f"{text!r}: expected HOSTNAME:MACHINE-ID, as "
                                 "'execguard breakglass host-id' prints on the target host")
        return cls.checked(hostname, machine_id.lower(), source)

    @classmethod
    def checked(cls, hostname: Any, machine_id: Any, source: str) -> HostId:
        if not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
            raise MalformedInput(source, f"host name {hostname!r} is not a valid hostname")
        if not isinstance(machine_id, str) or not _MACHINE_ID.match(machine_id):
            raise MalformedInput(source, f"machine-id {machine_id!r} is not 32 hex digits")
        return cls(hostname, machine_id)


def local_host_id(machine_id_path: str = MACHINE_ID_PATH) -> HostId:
    """This host's identity: the kernel's hostname and /etc/machine-id (systemd's, or the
    one dbus or systemd-machine-id-setup wrote). No machine-id: no binding, InputError."""
    try:
        with open(machine_id_path, encoding="ascii", errors="replace") as fh:
            machine_id = fh.read(256).strip()
    except OSError as exc:
        raise InputError(machine_id_path, f"cannot read the machine-id "
                         f"({exc.strerror or exc}); break-glass tokens are bound to it") from None
    return HostId.checked(socket.gethostname(), machine_id, machine_id_path)


@functools.lru_cache(maxsize=1)
def record_host() -> Dict[str, Optional[str]]:
    """The host as records name it, read once per process: hostname, machine-id (null where
    there is none: a container, a fresh image) and boot id (which boot of it)."""
    try:
        host: Dict[str, Optional[str]] = dict(local_host_id().to_json())
    except (InputError, MalformedInput):
        host = {"hostname": socket.gethostname(), "machine_id": None}
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as fh:
            host["boot_id"] = fh.read(64).strip() or None
    except OSError:
        host["boot_id"] = None
    return host
