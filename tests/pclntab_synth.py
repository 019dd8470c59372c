"""Synthetic Go runtime tables (pclntab, moduledata) in ELF images, built with struct.

The layouts follow debug/gosym and cmd/link (docs/goinfo.md); real binaries, built here or
downloaded, are in tests/goinfo_fixtures.py. These cover what no binary obtainable here
has (big-endian 1.2 and 1.16 layouts) and the hostile inputs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from tests.goinfo_synth import RW, TEXT, Image, Seg

PF_R = 4
MAGIC = {"1.2": 0xFFFFFFFB, "1.16": 0xFFFFFFFA, "1.18": 0xFFFFFFF0, "1.20": 0xFFFFFFF1}
PCLN_VA, DATA_VA = 0x480000, 0x500000
RECORD = 48  # bytes per synthetic _func record


@dataclass(frozen=True)
class Tables:
    pclntab: bytes  # the bytes at PCLN_VA
    moduledata: bytes  # the first words of a moduledata pointing at it


def tables(version: str = "1.20", bits: int = 64, big: bool = False, nfunc: int = 40,
           magic: Optional[int] = None, text: int = 0x401000) -> Tables:
    o = ">" if big else "<"
    ps = bits // 8
    w = o + ("Q" if ps == 8 else "I")
    magic = MAGIC[version] if magic is None else magic
    prefix = struct.pack(o + "IBBBB", magic, 0, 0, 1, ps)
    if version == "1.2":
        return _go12(prefix, o, w, ps, nfunc, text)
    words = 8 if version in ("1.18", "1.20") else 7
    header_size = 8 + words * ps
    small = [b"main.main\0runtime.main\0", b"\0" * 8, b"main.go\0", b"\x02\x04\x00\x00"]
    offs: List[int] = []
    body = b""
    for table in small:
        offs.append(header_size + len(body))
        body += table + b"\0" * (-len(table) % 8)
    pcln_off = header_size + len(body)
    offs.append(pcln_off)
    entry32 = words == 8
    field = 4 if entry32 else ps
    f = o + ("I" if entry32 else ("Q" if ps == 8 else "I"))
    table_size = (nfunc + 1) * 2 * field
    entries = [(i * 0x40 if entry32 else text + i * 0x40) for i in range(nfunc + 1)]
    functab = b"".join(struct.pack(f, entries[i]) + struct.pack(f, table_size + i * RECORD)
                       for i in range(nfunc))
    functab += struct.pack(f, entries[nfunc]) + struct.pack(f, 0)
    records = b"".join(struct.pack(f, entries[i]).ljust(RECORD, b"\0") for i in range(nfunc))
    counts = [nfunc, 3] + ([text] if entry32 else []) + offs
    header = prefix + b"".join(struct.pack(w, c) for c in counts)
    pclntab = header + body + functab + records
    p = PCLN_VA
    sizes = [len(t) for t in small] + [len(functab) + len(records)]
    md = [p]
    for off, size in zip(offs, sizes):
        md += [p + off, size, size]
    md += [p + pcln_off, nfunc + 1, nfunc + 1]
    return Tables(pclntab, b"".join(struct.pack(w, v) for v in md))


def _go12(prefix: bytes, o: str, w: str, ps: int, nfunc: int, text: int) -> Tables:
    functab_at = 8 + ps
    table_size = (2 * nfunc + 1) * ps + 4  # pairs, end entry, filetab offset
    first_record = functab_at + table_size
    functab = b"".join(struct.pack(w, text + i * 0x40) +
                       struct.pack(w, first_record + i * RECORD) for i in range(nfunc))
    functab += struct.pack(w, text + nfunc * 0x40) + struct.pack(o + "I", 0)
    records = b"".join(struct.pack(w, text + i * 0x40).ljust(RECORD, b"\0")
                       for i in range(nfunc))
    pclntab = prefix + struct.pack(w, nfunc) + functab + records
    p = PCLN_VA
    md = [p, len(pclntab), len(pclntab), p + functab_at, nfunc + 1, nfunc + 1]
    return Tables(pclntab, b"".join(struct.pack(w, v) for v in md))


def image(t: Tables, bits: int = 64, big: bool = False, with_moduledata: bool = True,
          sections: Tuple[Tuple[str, int], ...] = (), data_prefix: bytes = b"\0" * 64
          ) -> bytes:
    """Text, a read-only segment holding the pclntab, and a RW segment holding (after
    ``data_prefix``) the moduledata."""
    data = data_prefix + (t.moduledata if with_moduledata else b"") + b"\0" * 64
    return Image([TEXT, Seg(PF_R, PCLN_VA, t.pclntab), Seg(RW, DATA_VA, data)], bits, big,
                 sections=sections).build()
