"""The layout and radix constants are stated once per language: the values that
csrc/include/fsam/layout.h gives the compiled kernels (read from a program built on it) are
fsam_kernels/_layout.py's, and the radix digits cover the 32-bit keys exactly."""
import json
import os
import shutil
import subprocess

import pytest

from fsam_kernels import _layout
from conftest import ROOT

HEADER_DIR = os.path.join(ROOT, "csrc", "include")

# A program that prints what the header's constants evaluate to, as C++ sees them.
PROGRAM = r"""
#include <cstdio>
#include "fsam/layout.h"
using namespace fsam;
int main() {
  std::printf("{\"CHUNK\": %lld, \"CHUNK_BYTES\": %lld, \"SAVE_ALIGN\": %lld, ",
              (long long)kChunk, (long long)kChunkBytes, (long long)kSaveAlign);
  std::printf("\"RADIX_WIDTHS\": [%d, %d, %d], \"RADIX_SHIFTS\": [%d, %d, %d], ", kRadixWidth[0],
              kRadixWidth[1], kRadixWidth[2], kRadixShift[0], kRadixShift[1], kRadixShift[2]);
  std::printf("\"RADIX_HIST_SIZES\": [%lld, %lld, %lld], ", (long long)radix_hist_size(0),
              (long long)radix_hist_size(1), (long long)radix_hist_size(2));
  std::printf("\"STATE_PREFIX\": %d, \"STATE_K_LEFT\": %d, \"STATE_TIES\": %d, \"STATE_CANDIDATES\": %d, ",
              kStatePrefix, kStateKLeft, kStateTies, kStateCandidates);
  std::printf("\"RADIX_STATE_SIZE\": %d, \"CANDIDATE_KEY_BITS\": %d, \"FIRST_SHIFT\": %d, ", kRadixStateSize,
              kCandidateKeyBits, kFirstShift);
  std::printf("\"FIRST_BINS\": %lld, \"FIRST_HIST_SIZE\": %lld, \"DIGITS\": %d, \"CHUNKS_OF_4097\": %lld}\n",
              (long long)kFirstBins, (long long)kFirstHistSize, kRadixDigits, (long long)num_chunks(4097));
}
"""


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("layout")
    source, program = folder / "layout.cpp", folder / "layout"
    source.write_text(PROGRAM)
    subprocess.run([compiler, "-std=c++17", "-I", HEADER_DIR, str(source), "-o", str(program)], check=True)
    return json.loads(subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout)


def test_cpp_and_python_agree(cpp):
    assert cpp.pop("DIGITS") == len(_layout.RADIX_WIDTHS)
    assert cpp.pop("CHUNKS_OF_4097") == _layout.num_chunks(4097) == 2
    python = {name: getattr(_layout, name) for name in cpp}
    python = {k: list(v) if isinstance(v, tuple) else v for k, v in python.items()}
    assert cpp == python


def test_digits_cover_the_keys():
    assert sum(_layout.RADIX_WIDTHS) == 32
    assert all(s == sum(_layout.RADIX_WIDTHS[i + 1:]) for i, s in enumerate(_layout.RADIX_SHIFTS))
    assert _layout.RADIX_HIST_SIZES == tuple((1 << w) + 1 for w in _layout.RADIX_WIDTHS)
    assert _layout.FIRST_HIST_SIZE == _layout.RADIX_HIST_SIZES[0]
