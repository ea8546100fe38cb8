"""The layout and radix constants are stated once per language: fsam_kernels/_layout.py and
csrc/layout.h agree, and the radix digits cover the 32-bit keys exactly."""
import os
import re

from fsam_kernels import _layout

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "layout.h")


def cpp_constant(name):
    text = open(HEADER).read()
    value = re.search(rf"\b{name}(?:\[\w*\])? = ([^;]+);", text).group(1)
    return tuple(int(v) for v in re.findall(r"-?\d+", value)) if "{" in value else value.strip()


def test_cpp_and_python_agree():
    assert cpp_constant("kChunk") == str(_layout.CHUNK)
    assert cpp_constant("kChunkBytes") == "kChunk / 8" and _layout.CHUNK_BYTES == _layout.CHUNK // 8
    assert cpp_constant("kRadixWidth") == _layout.RADIX_WIDTHS
    assert cpp_constant("kRadixShift") == _layout.RADIX_SHIFTS
    assert cpp_constant("kFirstShift") == "kRadixShift[0]" and _layout.FIRST_SHIFT == _layout.RADIX_SHIFTS[0]


def test_digits_cover_the_keys():
    assert sum(_layout.RADIX_WIDTHS) == 32
    assert all(s == sum(_layout.RADIX_WIDTHS[i + 1:]) for i, s in enumerate(_layout.RADIX_SHIFTS))
    assert _layout.FIRST_HIST_SIZE == (1 << _layout.RADIX_WIDTHS[0]) + 1
