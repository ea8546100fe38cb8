"""Pieces every Triton kernel of the package shares."""
import triton
import triton.language as tl

from .._layout import CHUNK

BLOCK = CHUNK  # one program per chunk of the layout
# Round as the reference does: no fused multiply-add.
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}


def itemsize(dtype):
    import torch
    return torch.empty(0, dtype=dtype).element_size()


def tl_dtype(dtype):
    import torch
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@triton.jit
def chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK: tl.constexpr):
    """(member index, element offsets, in-bounds lanes) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    offs = tl.load(chunk_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < tl.load(numel + t)


@triton.jit
def only_if(lanes, flag):
    """`lanes` where the scalar `flag` holds, no lane elsewhere.  Not `lanes & flag`: Triton's
    interpreter cannot `and` a block with a scalar (3.9 makes an int64 block of it, which no load
    takes as a mask; older versions refuse a float comparison's scalar)."""
    return tl.where(flag, lanes, False)


@triton.jit
def member_ptr(addr_table, t, DT: tl.constexpr):
    """Pointer to the data of member t, from the int64 address table."""
    return tl.load(addr_table + t).to(tl.pointer_type(DT))


@triton.jit
def mask_lanes(bits, chunk, lanes, BLOCK: tl.constexpr):
    """`lanes` that the chunk's mask bits select (bit j of byte b is lane 8 b + j); a byte no
    lane of `lanes` needs is not read (a short chunk's mask past its end costs nothing)."""
    lane = tl.arange(0, BLOCK)
    byte = tl.load(bits + chunk * (BLOCK // 8) + lane // 8, mask=lanes, other=0)
    return lanes & (((byte >> (lane % 8).to(tl.uint8)) & 1) != 0)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 -> DT rounding to nearest even.  bfloat16 is rounded by hand: the interpreter's
    conversion truncates, and the hand rounding is what the GPU's cvt.rn does."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return tl.where(x != x, x, u.to(tl.float32, bitcast=True)).to(DT)
    else:
        return x.to(DT)


@triton.jit
def order_key(x, ABSOLUTE: tl.constexpr):
    """uint32 keys that order like the floats (-0 folded onto +0)."""
    u = x.to(tl.uint32, bitcast=True)
    if ABSOLUTE:
        u = u & 0x7FFFFFFF
    u = tl.where(u == 0x80000000, 0, u)
    return tl.where((u & 0x80000000) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)


@triton.jit
def count_digits(hist, digit, lanes, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += how many of `lanes` have digit d (global atomics, only for bins hit)."""
    bins = tl.arange(0, BINS)
    h = tl.histogram(tl.where(lanes, digit, 0), BINS)
    # lanes left out were counted in bin 0: take them back out (counts within a chunk fit int32)
    h = h - tl.where(bins == 0, BLOCK - tl.sum(lanes.to(tl.int32), 0), 0)
    tl.atomic_add(hist + bins, h.to(tl.int64), mask=h != 0)
