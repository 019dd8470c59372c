"""What every BCC sensor does before its program runs: the compile-time knobs, the struct
offsets of this kernel (from BTF, never from the headers BCC compiles with), the program
text, and BCC's failures turned into ``SensorUnavailable`` with the compiler's own words.

BCC rewrites map calls (``verdicts.lookup(&key)``) in the main file only; in an included
header they would stay calls through a function pointer, which the kernel refuses. So a
program that shares ``exec_verdict.h`` gets it pasted in place of its ``#include`` line
(``program_text``): one file in the tree, part of the main text for BCC.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from agent.sensors.errors import SensorUnavailable
from agent.sensors.kernel_layout import VMLINUX_BTF, Btf, LayoutError

# package data (pyproject.toml): an installed agent compiles the same text the tests load
BPF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
SHARED = "exec_verdict.h"
SHARED_INCLUDE = f'#include "{SHARED}"'
LOCKDOWN = "/sys/kernel/security/lockdown"

# How exec_verdict.h reads a kernel field. The BTF-typed programs (bpf-lsm, fmod-ret) load
# it directly; a tracepoint program's pointers are plain numbers to the verifier, so the
# kill backend reads the same fields with bpf_probe_read_kernel (a failed read gives 0,
# which every caller treats as "cannot place": in scope).
LOAD_DIRECT = "#define EG_LOAD(type, base, off) (*(type *)((const char *)(base) + (off)))"
LOAD_PROBE_READ = (
    "#define EG_LOAD(type, base, off) ({ type __eg_v = (type)0; \\\n"
    "\tbpf_probe_read_kernel(&__eg_v, sizeof(__eg_v), (const char *)(base) + (off)); \\\n"
    "\t__eg_v; })")

OffsetsFn = Callable[[Btf, bytes], Dict[str, int]]


@dataclass(frozen=True)
class SensorConfig:
    """Compile-time knobs of a BPF sensor (validated before they reach the C text)."""

    ringbuf_pages: int = 64  # ring buffer size in pages (power of two): 256 KiB by default
    verdict_max: int = 65536  # entries in the kernel verdict map
    scope_max: int = 64  # scope directories inside PARTIAL filesystems

    def cflags(self) -> List[str]:
        pages = self.ringbuf_pages
        if pages < 1 or pages > 1 << 16 or pages & (pages - 1):
            raise ValueError(f"ringbuf_pages must be a power of two in 1..65536, not {pages}")
        for name, v in (("verdict_max", self.verdict_max), ("scope_max", self.scope_max)):
            if not 1 <= int(v) <= 1 << 24:
                raise ValueError(f"{name} must be in 1..16777216, not {v}")
        return [
            f"-DEG_RINGBUF_PAGES={int(pages)}",
            f"-DEG_VERDICT_MAX={int(self.verdict_max)}",
            f"-DEG_SCOPE_MAX={int(self.scope_max)}",
        ]


def build_cflags(config: SensorConfig, backend: str, offsets_fn: OffsetsFn,
                 btf_path: str = VMLINUX_BTF, offsets: Optional[Dict[str, int]] = None,
                 btf_hint: Optional[str] = None) -> List[str]:
    """Include dir, knobs (validated by SensorConfig) and this kernel's offsets.
    ``offsets`` replaces the BTF lookup (a test that proves the self-test catches a wrong
    one, or a kernel whose layout the operator knows)."""
    flags = [f"-I{BPF_DIR}", *config.cflags()]
    if offsets is None:
        hint = btf_hint or f"{backend} needs kernel BTF (CONFIG_DEBUG_INFO_BTF=y)"
        try:
            with open(btf_path, "rb") as f:
                blob = f.read()
            offsets = offsets_fn(Btf(blob, btf_path), blob)
        except OSError as exc:
            raise SensorUnavailable(backend, f"{btf_path}: cannot read kernel BTF: "
                                    f"{exc.strerror}", hint) from exc
        except LayoutError as exc:
            raise SensorUnavailable(backend, f"cannot read struct offsets: {exc}",
                                    hint) from exc
    return flags + [f"-D{k}={int(v)}" for k, v in sorted(offsets.items())]


def program_text(source: str, backend: str, load: str = LOAD_DIRECT) -> str:
    """``programs/<source>`` with exec_verdict.h pasted in place of its ``#include`` (a source
    without that line is returned as it is). ``load``: the header's ``EG_LOAD`` definition
    for this program (LOAD_PROBE_READ for tracepoint programs)."""
    path = os.path.join(BPF_DIR, source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        at = [i for i, line in enumerate(lines) if line.strip() == SHARED_INCLUDE]
        if not at:
            return text
        with open(os.path.join(BPF_DIR, SHARED), encoding="utf-8") as f:
            shared = f.read()
    except OSError as exc:
        raise SensorUnavailable(backend, f"{exc.filename}: cannot read the BPF program: "
                                f"{exc.strerror}") from exc
    if len(at) != 1:
        raise SensorUnavailable(backend, f"{path}: expected one {SHARED_INCLUDE} line, "
                                f"found {len(at)}")
    if load != LOAD_DIRECT:
        defs = [ln for ln in shared.split("\n") if ln.strip().startswith("#define EG_LOAD(")]
        if defs != [LOAD_DIRECT]:
            raise SensorUnavailable(backend, f"{os.path.join(BPF_DIR, SHARED)}: its EG_LOAD "
                                    f"definition changed ({defs}); {source} needs it as "
                                    f"{LOAD_DIRECT!r} to read fields another way")
        shared = shared.replace(LOAD_DIRECT, load)
    lines[at[0]] = f"/* ---- {SHARED}, pasted by agent/sensors/bpf/build.py ---- */\n{shared}"
    return "\n".join(lines)


@contextlib.contextmanager
def captured_stderr() -> Iterator[List[str]]:
    """libbcc writes compiler and verifier messages to fd 2: keep them for the error."""
    out: List[str] = []
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            out.extend(log.read()[-8000:].decode("utf-8", "replace").splitlines())


def explain(exc: Exception, log: List[str]) -> Tuple[str, Optional[str]]:
    """The cause and a hint for a BCC compile, load or attach failure."""
    from agent.sensors.bcc_probe import probe_headers

    lines = [ln.strip() for ln in log if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln][:3]  # the first compiler errors explain most
    text = " | ".join(errors or lines)
    if "kconfig.h" in text or "Unable to find kernel headers" in text:
        return "BCC cannot compile: no kernel headers", probe_headers(os.uname().release).hint
    if "Operation not permitted" in text or isinstance(exc, PermissionError):
        return f"{exc}: {text[-300:]}", "run as root with CAP_BPF and CAP_PERFMON/CAP_SYS_ADMIN"
    return f"{exc}: {text[-400:]}" if text else str(exc), "run execguard doctor"


def header_warnings(backend: str) -> Tuple[str, ...]:
    """Say loudly when BCC compiles against another kernel's headers (our 6.18 dev VM)."""
    from agent.sensors.bcc_probe import probe_headers

    res = probe_headers(os.uname().release)
    if res.ok:
        return ()
    return (
        f"{res.detail}. The {backend} program reads struct fields at offsets from this "
        "kernel's BTF, not from those headers; the self-test checks the result.",
    )


def lockdown_level(path: str = LOCKDOWN) -> Optional[str]:
    """The bracketed word of the kernel's lockdown file, or None (no lockdown LSM, no
    securityfs, or not readable)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def realtime_offset() -> int:
    """CLOCK_REALTIME - CLOCK_BOOTTIME: maps the kernel's boot clock to wall time."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
        time.CLOCK_BOOTTIME)
