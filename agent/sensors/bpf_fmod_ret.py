"""The fmod_ret backend (exec_fmod_ret.c): EPERM from ``security_bprm_check`` where BPF
LSM is not active.

A ``BPF_MODIFY_RETURN`` program is a tracing program: it needs BTF and BPF trampolines, but
no ``bpf`` in ``lsm=``. It shares the verdict map, the decision and the ring records of the
BPF LSM backend (exec_verdict.h), so ``BpfFmodRetSensor`` is ``BpfLsmSensor`` with
another program: fentry invalidation hooks on the ``security_*`` functions, and the exec's
path taken at its FMODE_EXEC open (``bpf_d_path`` is not allowed in security_bprm_check).
"""

from __future__ import annotations

from typing import Dict

from agent.sensors.bpf_lsm import BpfLsmSensor, verdict_offsets
from agent.sensors.kernel_layout import Btf

BACKEND = "fmod-ret"
SOURCE = "exec_fmod_ret.c"
# The BPF_MODIFY_RETURN programs of exec_fmod_ret.c, attached by name (``tracing_hooks``).
HOOKS = tuple(b"kmod_ret__security_" + name for name in (
    b"bprm_check", b"mmap_file", b"file_mprotect", b"sb_mount", b"move_mount",
    b"ptrace_access_check"))


def fmod_ret_offsets(btf: Btf, blob: bytes) -> Dict[str, int]:
    """The ``EG_*`` macros exec_fmod_ret.c needs: its setattr hook is the kernel's own
    ``security_inode_setattr`` (2 parameters on 6.1, 3 once an idmap came first)."""
    return verdict_offsets(btf, blob, "security_inode_setattr")


class BpfFmodRetSensor(BpfLsmSensor):
    """Loaded and attached on construction (allow everything until ``set_mode``); ``close()``
    detaches the hook first, so the kernel then denies nothing."""

    backend = BACKEND
    source = SOURCE
    self_protection = False  # tracing programs: no hook refuses signals or bpf()
    offsets_fn = staticmethod(fmod_ret_offsets)  # type: ignore[assignment]
    refused_hint = ("this kernel does not let fmod_ret programs load or attach (no BPF "
                    "trampolines, or a hardened kernel); run execguard doctor")

    # BCC attaches the fentry (kfunc__) hooks itself and leaves kmod_ret__ alone (BCC < 0.35
    # has no attach_fmod_ret()): the loader loads each as tracing and attaches it by its fd
    tracing_hooks = HOOKS
