"""Which mappings the release after a sensor's load pages out (agent/sensors/bpf/memory.py):
the compiler libraries' read-only ones, never a writable one (a library's data)."""

from __future__ import annotations

from agent.sensors.bpf.memory import compiler_mappings

MAPS = """\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 100 /usr/bin/python3.11
7f0000000000-7f0000100000 r--p 00000000 08:01 200 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0000100000-7f0004000000 r-xp 00100000 08:01 200 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0004000000-7f0004100000 rw-p 04000000 08:01 200 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0005000000-7f0006000000 r-xp 00000000 08:01 300 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0007000000-7f0008000000 r-xp 00000000 08:01 400 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
7f0009000000-7f0009001000 r-xp 00000000 08:01 500 /opt/mylibbcc-notes/libc.so.6
7f000a000000-7f000a001000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""


def test_only_read_only_mappings_of_the_compiler_libraries() -> None:
    assert compiler_mappings(MAPS) == [
        (0x7F0000000000, 0x7F0000100000), (0x7F0000100000, 0x7F0004000000),
        (0x7F0005000000, 0x7F0006000000), (0x7F0007000000, 0x7F0008000000)]


def test_a_listing_without_them_gives_nothing() -> None:
    assert compiler_mappings("") == []
    assert compiler_mappings("garbage\n7f00-7f01 r-xp 0 0 0\n") == []
