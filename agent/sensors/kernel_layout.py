"""Field offsets of the running kernel, read from its BTF (``/sys/kernel/btf/vmlinux``).

BCC compiles against whatever headers it finds. On our 6.18 dev VM those are Debian's 6.1
headers, and ``struct inode`` changed between them (6.1 ``i_ctime`` timespec64, 6.11+
``i_ctime_sec`` + ``i_ctime_nsec``), as did ``struct task_struct``. So the exec sensor reads
no field through a header struct: it adds these offsets, passed as ``-D`` cflags, to the
base pointers. The identity self-test then checks the result against ``stat()``.

Only the parts of the BTF format needed to find struct members are parsed (kernel
``Documentation/bpf/btf.rst``): the header, the string section and every type record's
length, so the walk can skip what it does not need.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF kinds and the bytes that follow each 12-byte type record (vlen = members/params).
_KIND_STRUCT, _KIND_UNION = 4, 5
_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG = 8, 9, 10, 11, 18
_KIND_INT, _KIND_PTR, _KIND_ENUM, _KIND_ENUM64 = 1, 2, 6, 19
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT, UNION, ENUM, FUNC_PROTO, ...
_MODIFIERS = (_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG)


class LayoutError(Exception):
    """The BTF is missing, malformed, or lacks a field the sensor needs."""


@dataclass(frozen=True)
class Field:
    offset: int  # bytes from the start of the struct
    size: int  # bytes


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    members: Tuple[Tuple[str, int, int], ...]  # (name, type id, bit offset)


class Btf:
    """The struct types of one BTF blob, looked up by name."""

    def __init__(self, blob: bytes, source: str = VMLINUX_BTF) -> None:
        self.source = source
        self._types: List[Optional[_Type]] = [None]  # type id 0 is void
        self._structs: Dict[str, int] = {}
        try:
            self._parse(blob)
        except (struct.error, IndexError, ValueError) as exc:  # ValueError: no NUL, bad UTF-8
            raise LayoutError(f"{source}: malformed BTF ({exc})") from exc

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as exc:
            raise LayoutError(f"{path}: cannot read kernel BTF: {exc.strerror}") from exc

    def _parse(self, blob: bytes) -> None:
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise LayoutError(f"{self.source}: not BTF (magic {magic:#x}); big-endian unsupported")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]

        def name(off: int) -> str:
            return strings[off : strings.index(b"\0", off)].decode("utf-8")

        pos = 0
        while pos < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, pos)
            pos += 12
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            members: Tuple[Tuple[str, int, int], ...] = ()
            if kind in (_KIND_STRUCT, _KIND_UNION):
                mem = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, pos + 12 * i)
                    # kind_flag: the top 8 bits are a bitfield size, the rest the bit offset
                    mem.append((name(m_name), m_type, m_off & 0xFFFFFF if kind_flag else m_off))
                members = tuple(mem)
            elif kind > 19:
                raise LayoutError(f"{self.source}: unknown BTF kind {kind}")
            pos += _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            t = _Type(kind, name(name_off) if kind in (4, 5, 8) else "", size_or_type, members)
            if kind == _KIND_STRUCT and t.name and t.name not in self._structs:
                self._structs[t.name] = len(self._types)
            self._types.append(t)

    def _resolve(self, type_id: int) -> _Type:
        for _ in range(32):  # modifier chains are short; a loop here means bad BTF
            if not 0 <= type_id < len(self._types):
                raise LayoutError(f"{self.source}: type id {type_id} out of range")
            t = self._types[type_id]
            if t is None or t.kind not in _MODIFIERS:
                break
            type_id = t.size_or_type
        if t is None:
            raise LayoutError(f"{self.source}: field of type void")
        return t

    def _size(self, t: _Type) -> int:
        if t.kind == _KIND_PTR:
            return 8
        if t.kind in (_KIND_INT, _KIND_ENUM, _KIND_ENUM64, _KIND_STRUCT, _KIND_UNION):
            return t.size_or_type
        raise LayoutError(f"{self.source}: cannot size BTF kind {t.kind}")

    def _find(self, type_id: int, member: str, depth: int = 0) -> Optional[Tuple[int, _Type]]:
        """Bit offset and type of ``member``, looking inside anonymous structs and unions."""
        if depth > 8:
            raise LayoutError(f"{self.source}: anonymous members nested too deep")
        t = self._resolve(type_id)
        for m_name, m_type, bits in t.members:
            if m_name == member:
                return bits, self._resolve(m_type)
            if not m_name:
                inner = self._find(m_type, member, depth + 1)
                if inner is not None:
                    return bits + inner[0], inner[1]
        return None

    def field(self, struct_name: str, member: str) -> Optional[Field]:
        """Offset and size of ``struct_name.member``, or None when it has no such member."""
        sid = self._structs.get(struct_name)
        if sid is None:
            raise LayoutError(f"{self.source}: no struct {struct_name}")
        found = self._find(sid, member)
        if found is None:
            return None
        bits, t = found
        if bits % 8:
            raise LayoutError(f"{self.source}: {struct_name}.{member} is a bitfield")
        return Field(bits // 8, self._size(t))

    def require(self, struct_name: str, member: str, *sizes: int) -> Field:
        f = self.field(struct_name, member)
        if f is None:
            raise LayoutError(f"{self.source}: struct {struct_name} has no member {member}")
        if sizes and f.size not in sizes:
            raise LayoutError(
                f"{self.source}: {struct_name}.{member} is {f.size} bytes, expected {sizes}"
            )
        return f


def exec_sensor_offsets(btf: Btf) -> Dict[str, int]:
    """The ``EG_OFF_*`` / ``EG_SZ_*`` macros exec_sensor.c needs, from this kernel's BTF."""
    need = {
        "EG_OFF_BPRM_FILE": btf.require("linux_binprm", "file", 8),
        "EG_OFF_BPRM_FILENAME": btf.require("linux_binprm", "filename", 8),
        "EG_OFF_BPRM_INTERP": btf.require("linux_binprm", "interp", 8),
        "EG_OFF_FILE_INODE": btf.require("file", "f_inode", 8),
        "EG_OFF_INODE_INO": btf.require("inode", "i_ino", 8),
        "EG_OFF_INODE_SB": btf.require("inode", "i_sb", 8),
        "EG_OFF_INODE_SIZE": btf.require("inode", "i_size", 8),
        "EG_OFF_SB_DEV": btf.require("super_block", "s_dev", 4),
        "EG_OFF_TASK_REAL_PARENT": btf.require("task_struct", "real_parent", 8),
        "EG_OFF_TASK_TGID": btf.require("task_struct", "tgid", 4),
    }
    out = {k: f.offset for k, f in need.items()}
    # loginuid exists only with CONFIG_AUDIT; without it every auid reads as unset (-1).
    loginuid = btf.field("task_struct", "loginuid")
    if loginuid is not None:
        if loginuid.size != 4:
            raise LayoutError(f"{btf.source}: task_struct.loginuid is {loginuid.size} bytes")
        out["EG_OFF_TASK_LOGINUID"] = loginuid.offset
    out.update(inode_time_offsets(btf, "ctime"))
    return out


def inode_time_offsets(btf: Btf, which: str) -> Dict[str, int]:
    """``EG_OFF_INODE_<WHICH>_SEC``/``_NSEC`` and ``EG_SZ_INODE_<WHICH>_NSEC`` for ``ctime``
    or ``mtime``: 6.11+ keeps seconds and nanoseconds apart, 6.6-6.10 call the timespec64
    ``__i_<which>``, older kernels ``i_<which>``."""
    sec = btf.field("inode", f"i_{which}_sec")
    if sec is not None:
        nsec = btf.require("inode", f"i_{which}_nsec", 4, 8)
    else:
        ts = btf.field("inode", f"__i_{which}") or btf.require("inode", f"i_{which}", 16)
        sec, nsec = Field(ts.offset, 8), Field(ts.offset + 8, 8)
    up = which.upper()
    return {f"EG_OFF_INODE_{up}_SEC": sec.offset, f"EG_OFF_INODE_{up}_NSEC": nsec.offset,
            f"EG_SZ_INODE_{up}_NSEC": nsec.size}
