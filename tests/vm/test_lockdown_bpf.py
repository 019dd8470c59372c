"""What lockdown takes away from BPF and tracing (platforms.md §1.2), tried for real with BCC.

- confidentiality: helpers that read kernel memory (``bpf_probe_read_kernel{,_str}``, compat
  ``bpf_probe_read``) are refused when the program is verified; kprobes cannot be registered;
  tracefs cannot be opened.
- integrity: ``bpf_probe_write_user`` is refused at verification.
- every mode: ``bpf_probe_read_user`` and map-only programs load (the control that shows the
  refusals are about those helpers, not BPF as such).
One BCC compile per session; each function is loaded on its own.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Iterator

import pytest

from tests.vm.guest_env import at_least

pytestmark = pytest.mark.timeout(180)

SOURCE = r"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 1);

int eg_read_kernel(struct pt_regs *ctx) {
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)PT_REGS_PARM1(ctx));
    return v == 1;
}
int eg_read_kernel_str(struct pt_regs *ctx) {
    char buf[16] = {};
    bpf_probe_read_kernel_str(buf, sizeof(buf), (void *)PT_REGS_PARM1(ctx));
    return buf[0] == 'x';
}
int eg_read_compat(struct pt_regs *ctx) {
    u64 v = 0;
    bpf_probe_read(&v, sizeof(v), (void *)PT_REGS_PARM1(ctx));
    return v == 1;
}
int eg_write_user(struct pt_regs *ctx) {
    u64 v = 0;
    bpf_probe_write_user((void *)PT_REGS_PARM1(ctx), &v, sizeof(v));
    return 0;
}
int eg_read_user(struct pt_regs *ctx) {
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)PT_REGS_PARM1(ctx));
    return v == 1;
}
int eg_count(struct pt_regs *ctx) {
    int k = 0;
    u64 *h = hits.lookup(&k);
    if (h)
        __sync_fetch_and_add(h, 1);
    return 0;
}
"""

# function -> (helper the verifier names, the lowest lockdown level that refuses it or None)
HELPERS = {
    "eg_read_kernel": ("bpf_probe_read_kernel", "confidentiality"),
    "eg_read_kernel_str": ("bpf_probe_read_kernel_str", "confidentiality"),
    "eg_read_compat": ("bpf_probe_read", "confidentiality"),
    "eg_write_user": ("bpf_probe_write_user", "integrity"),
    "eg_read_user": ("bpf_probe_read_user", None),
    "eg_count": ("", None),
}


@pytest.fixture(scope="module")
def bpf() -> Iterator[Any]:
    from bcc import BPF

    b = BPF(text=SOURCE.encode())
    try:
        yield b
    finally:
        b.cleanup()


@pytest.mark.parametrize("func", sorted(HELPERS))
def test_helper_load(bpf: Any, func: str, lockdown_mode: str,
                     capfd: pytest.CaptureFixture[str]) -> None:
    from bcc import BPF

    helper, refused_from = HELPERS[func]
    if refused_from is not None and at_least(lockdown_mode, refused_from):
        with pytest.raises(Exception, match="Failed to load BPF program"):
            bpf.load_func(func, BPF.KPROBE)
        log = capfd.readouterr().err
        # 6.1 says "unknown func <helper>#<id>"; newer kernels "cannot use helper <helper>"
        assert f"{helper}#" in log, log[-2000:]
    else:
        fn = bpf.load_func(func, BPF.KPROBE)
        assert fn.fd >= 0


def test_kprobe_attach(bpf: Any, lockdown_mode: str) -> None:
    """LOCKDOWN_KPROBES (confidentiality) refuses kprobe registration; below it, the kprobe
    is attached and fires."""
    event = bpf.get_syscall_fnname("getppid")
    if at_least(lockdown_mode, "confidentiality"):
        with pytest.raises(Exception, match="Failed to attach BPF program"):
            bpf.attach_kprobe(event=event, fn_name="eg_count")
        return
    hits = bpf["hits"]
    hits[hits.Key(0)] = hits.Leaf(0)
    bpf.attach_kprobe(event=event, fn_name="eg_count")
    try:
        for _ in range(5):
            os.getppid()
        assert hits[hits.Key(0)].value >= 5
    finally:
        bpf.detach_kprobe(event=event)


def _open_errno(path: str) -> int:
    try:
        with open(path, "rb") as f:
            f.read(64)
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_tracefs(lockdown_mode: str, lockdown_origin: str) -> None:
    """LOCKDOWN_TRACEFS. Raised at runtime: files that open through
    tracing_check_open_get_tr() (``trace``, ``trace_pipe``) fail with EPERM, but an event's
    ``id`` file has no such check and stays readable, so classic tracepoints still attach.
    With lockdown=confidentiality at boot, tracefs creates no files at all."""
    trace = _open_errno("/sys/kernel/tracing/trace")
    event_id = _open_errno("/sys/kernel/tracing/events/sched/sched_process_exec/id")
    if not at_least(lockdown_mode, "confidentiality"):
        want = (0, 0)
    elif lockdown_origin == "runtime":
        want = (errno.EPERM, 0)
    else:
        want = (errno.ENOENT, errno.ENOENT)
    assert (trace, event_id) == want
