"""The layout and radix constants are stated once per language: fsam_kernels/_layout.py and
csrc/include/fsam/layout.h agree, and the radix digits cover the 32-bit keys exactly."""
import os
import re

from fsam_kernels import _layout
from conftest import ROOT

HEADER = os.path.join(ROOT, "csrc", "include", "fsam", "layout.h")


def cpp_constant(name):
    text = open(HEADER).read()
    value = re.search(rf"\b{name}(?:\[\w*\])? = ([^;]+);", text).group(1)
    return tuple(int(v) for v in re.findall(r"-?\d+", value)) if "{" in value else value.strip()


def test_cpp_and_python_agree():
    assert cpp_constant("kChunk") == str(_layout.CHUNK)
    assert cpp_constant("kChunkBytes") == "kChunk / 8" and _layout.CHUNK_BYTES == _layout.CHUNK // 8
    assert cpp_constant("kSaveAlign") == str(_layout.SAVE_ALIGN)
    assert cpp_constant("kRadixWidth") == _layout.RADIX_WIDTHS
    assert cpp_constant("kRadixShift") == _layout.RADIX_SHIFTS
    assert cpp_constant("kFirstShift") == "kRadixShift[0]" and _layout.FIRST_SHIFT == _layout.RADIX_SHIFTS[0]
    state = [cpp_constant(n) for n in ("kStatePrefix", "kStateKLeft", "kStateTies", "kStateCandidates",
                                        "kRadixStateSize", "kCandidateKeyBits")]
    assert state == [str(v) for v in (_layout.STATE_PREFIX, _layout.STATE_K_LEFT, _layout.STATE_TIES,
                                      _layout.STATE_CANDIDATES, _layout.RADIX_STATE_SIZE,
                                      _layout.CANDIDATE_KEY_BITS)]


def test_digits_cover_the_keys():
    assert sum(_layout.RADIX_WIDTHS) == 32
    assert all(s == sum(_layout.RADIX_WIDTHS[i + 1:]) for i, s in enumerate(_layout.RADIX_SHIFTS))
    assert _layout.RADIX_HIST_SIZES == tuple((1 << w) + 1 for w in _layout.RADIX_WIDTHS)
    assert _layout.FIRST_HIST_SIZE == _layout.RADIX_HIST_SIZES[0]
