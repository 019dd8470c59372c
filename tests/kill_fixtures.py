"""Programs for the kill backend's boundary tests, built with gcc in the test session.

The attack programs come from the attack suite (tests/attacks/progs: payload, benign,
loader, preload, memfd-exec, blob); two more are the kill backend's own, for what only a
syscall tracepoint has to worry about: ``shmat-exec`` (SHM_EXEC attaches a SysV segment
executable, no mmap(2) at all) and ``mmap-int80`` (the 32-bit mmap2 through ``int $0x80``
from a 64-bit process, which the syscall tracepoints do not see). Every program prints
``EG-PWNED`` only from attacker code, like the attack suite's (tests/attacks/harness.py
classifies the runs).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, Sequence, Tuple

from tests.attacks.harness import MARKER, PROGS

SHMAT_EXEC = r"""
/* shmat-exec BLOB: copy BLOB into a SysV segment, attach it SHM_EXEC, jump into it. */
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char code[4096];
    int fd = open(argv[1], O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, code, sizeof code);
    if (n <= 0) { dprintf(2, "EG-ERROR read blob\n"); return 70; }
    int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    if (id < 0) { dprintf(2, "EG-ERROR shmget\n"); return 70; }
    char *rw = shmat(id, NULL, 0);
    memcpy(rw, code, (size_t)n);
    shmdt(rw);
    void *x = shmat(id, NULL, SHM_EXEC | SHM_RDONLY);
    shmctl(id, IPC_RMID, NULL);
    if (x == (void *)-1) { dprintf(2, "EG-DENIED shmat\n"); return 126; }
    ((void (*)(void))x)();
    return 70;
}
"""

MMAP_INT80 = r"""
/* mmap-int80 BLOB: map BLOB PROT_READ|PROT_EXEC with the 32-bit mmap2 (int $0x80) from a
 * 64-bit process, then jump into it (the mapping is below 4 GiB). */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { dprintf(2, "EG-ERROR open\n"); return 70; }
    long ret, nr = 192 /* mmap2 */, len = 4096, prot = 5, flags = 2, pgoff = 0;
    asm volatile("push %%rbp\n\tmov %[pg], %%rbp\n\tint $0x80\n\tpop %%rbp"
                 : "=a"(ret)
                 : "a"(nr), "b"(0L), "c"(len), "d"(prot), "S"(flags), "D"((long)fd),
                   [pg] "r"(pgoff)
                 : "memory", "r8", "r9", "r10", "r11");
    if ((unsigned long)ret > 0xfffff000UL) { dprintf(2, "EG-DENIED mmap2\n"); return 126; }
    ((void (*)(void))(unsigned long)(unsigned)ret)();
    return 70;
}
"""

# name -> gcc arguments after the output (sources under PROGS unless absolute)
_GCC: Dict[str, Tuple[str, ...]] = {
    "payload-dyn": ("payload.c",),
    "payload-static": ("payload.c", "-static"),
    "benign-dyn": ("benign.c",),
    "loader": ("loader.c",),
    "preload.so": ("preload.c", "-shared", "-fPIC"),
    "memfd-exec": ("memfd_exec.c",),
}


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed: {list(argv)}\n{proc.stdout}\n{proc.stderr}")


def build_tools(dest: Path) -> Dict[str, Path]:
    """Every program above, built into ``dest`` (which must exist): name -> path."""
    out: Dict[str, Path] = {}
    for name, (src, *flags) in _GCC.items():
        out[name] = dest / name
        _run(["gcc", "-O2", "-Wall", *flags, "-o", str(out[name]), str(PROGS / src)])
    for name, text in (("shmat-exec", SHMAT_EXEC), ("mmap-int80", MMAP_INT80)):
        src_path = dest / f"{name}.c"
        src_path.write_text(text)
        out[name] = dest / name
        _run(["gcc", "-O1", "-Wall", "-o", str(out[name]), str(src_path)])
    obj = dest / "blob.o"
    _run(["gcc", "-c", f'-DMARKER="{MARKER} blob"', "-o", str(obj), str(PROGS / "blob.S")])
    out["blob.bin"] = dest / "blob.bin"
    _run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out["blob.bin"])])
    for path in out.values():
        path.chmod(0o755)
    return out


def place(src: Path, dst: Path) -> Path:
    """A copy of ``src`` at ``dst`` (mode 0755), with its parent directories."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o755)
    return dst


def keypair(dest: Path) -> Tuple[Path, Path]:
    """A P-256 key pair for the test (private PEM, public PEM)."""
    priv, pub = dest / "test.key", dest / "test.pub"
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-out", str(priv)])
    _run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)])
    return priv, pub


def scope_policy(path: Path, scope: Path, key: Path, rules: Sequence[str] = ()) -> Path:
    """Enforce mode, ``scope`` only, every file in it signed by ``key`` (after ``rules``)."""
    extra = "".join(f"{r}\n\n" for r in rules)
    path.write_text(f"""version = 1
mode = "enforce"
scopes = ["{scope}"]
on_timeout = "deny"
fallthrough = "deny"

[limits]
decision_deadline_ms = 5000

[trust]
keys = ["{key}"]

{extra}[[rules]]
id = "all-signed"
action = "require-signature"
""")
    return path
