"""Where each tensor of a list lives in the packed mask and in the saved-values buffer, and the
radix digits of the top-k.

Every backend shares this layout (csrc/include/fsam/layout.h holds the same constants in C++): a list is cut into
chunks of CHUNK elements inside each tensor; tensor i's mask bits start at byte
CHUNK_BYTES * (its first chunk), bit j of a byte is element 8 * byte + j.  The originals of
the masked entries of a tensor are saved contiguously, in its own dtype and element order,
each tensor's run starting on a SAVE_ALIGN-byte boundary; chunk c writes from
save_offsets[c] on.
"""
import torch

CHUNK = 4096
CHUNK_BYTES = CHUNK // 8
SAVE_ALIGN = 16

# Radix select over the 32-bit order-preserving keys: three digits, most significant first.  The
# histogram of digit d has 2**RADIX_WIDTHS[d] bins and, last, a count of NaN scores (digit 0 only).
RADIX_WIDTHS = (11, 11, 10)
RADIX_SHIFTS = (21, 10, 0)
RADIX_BINS = tuple(1 << w for w in RADIX_WIDTHS)
RADIX_HIST_SIZES = tuple(b + 1 for b in RADIX_BINS)
# The radix state carried between the stages: the key prefix chosen so far, how many keys under
# it are still to take, how many keys share the last digit chosen, and how many candidates the
# digit-1 pass appended to the candidate buffer (more than it holds: the buffer is not used).
STATE_PREFIX, STATE_K_LEFT, STATE_TIES, STATE_CANDIDATES = range(4)
RADIX_STATE_SIZE = 4
# The candidate buffer: the digit-1 pass, when the keys under the first digit chosen fit, appends
# each as (chunk << 32) | key, and digit 2 and the tie counts read those instead of the scores.
# Its default capacity is a 1/CANDIDATE_DIVISOR of the list (the k-th key's first digit holds
# 1-6 % of the scores of a Fisher-like list for k up to 10 %; AIR top-k keeps 1/32).
CANDIDATE_DIVISOR = 16
CANDIDATE_KEY_BITS = 32
# The first digit's histogram, which fisher_accumulate_ can emit while it writes the scores.
FIRST_SHIFT = RADIX_SHIFTS[0]
FIRST_BINS = RADIX_BINS[0]
FIRST_HIST_SIZE = RADIX_HIST_SIZES[0]

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)
_POPCOUNT_BLOCK = 256  # chunks counted at a time: 1 MiB of scratch, whatever the list


def num_chunks(numel):
    return -(-numel // CHUNK)


def chunk_popcounts(bits):
    """Per chunk (int64, on the bits' device): the set bits of a packed mask, counted a block of
    chunks at a time (the scratch does not grow with the list)."""
    rows = bits.view(-1, CHUNK_BYTES)
    table = _POPCOUNT.to(bits.device)
    return torch.cat([table[rows[b:b + _POPCOUNT_BLOCK].long()].sum(1) for b in range(0, rows.shape[0], _POPCOUNT_BLOCK)]
                     or [torch.zeros(0, dtype=torch.int64, device=bits.device)])


def chunk_sizes(numels):
    """Per chunk of a list of tensors of these element counts (int32, on the CPU): its elements."""
    counts = torch.full((sum(num_chunks(n) for n in numels),), CHUNK, dtype=torch.int32)
    last = 0
    for n in numels:
        last += num_chunks(n)
        if n:
            counts[last - 1] = n - CHUNK * (num_chunks(n) - 1)
    return counts


def total_chunks(tensors):
    """Chunks of a whole list (every tensor's, whatever its dtype)."""
    return sum(num_chunks(t.numel()) for t in tensors)


class ChunkLayout:
    """The chunk layout of one list of tensors (fixed shapes, dtypes and device)."""

    def __init__(self, tensors):
        tensors = list(tensors)
        self.numels = [t.numel() for t in tensors]
        self.shapes = [tuple(t.shape) for t in tensors]
        self.itemsizes = [t.element_size() for t in tensors]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.chunks = [num_chunks(n) for n in self.numels]
        self.first_chunk = []
        total = 0
        for c in self.chunks:
            self.first_chunk.append(total)
            total += c
        self.total_chunks = total
        self.mask_bytes = total * CHUNK_BYTES
        self.numel = sum(self.numels)
        counts = torch.tensor(self.chunks, dtype=torch.int64)
        self.tensor_of_chunk = torch.repeat_interleave(torch.arange(len(tensors)), counts).to(self.device)
        self._itemsize_of_chunk = torch.tensor(self.itemsizes, dtype=torch.int64, device=self.device)[
            self.tensor_of_chunk]
        self._first_chunk_of_chunk = torch.tensor(self.first_chunk, dtype=torch.int64, device=self.device)[
            self.tensor_of_chunk]

    def full_counts(self):
        """Per-chunk element counts: the popcounts of an all-ones mask."""
        return chunk_sizes(self.numels).to(self.device)

    def tensor_sums(self, per_chunk):
        """Per tensor: the sum of an int64 per-chunk quantity over the tensor's chunks."""
        sums = torch.zeros(len(self.numels), dtype=torch.int64, device=per_chunk.device)
        return sums.index_add_(0, self.tensor_of_chunk, per_chunk.to(torch.int64))

    def before_in_tensor(self, per_chunk):
        """Per chunk: the sum of an int64 per-chunk quantity over the earlier chunks of its tensor."""
        per_chunk = per_chunk.to(torch.int64)
        before = torch.cumsum(per_chunk, 0) - per_chunk
        return before - before[self._first_chunk_of_chunk]

    def save_offsets(self, chunk_counts):
        """Byte offset of each chunk's saved values, and the buffer size as a 0-dim tensor."""
        nbytes = chunk_counts.to(torch.int64) * self._itemsize_of_chunk
        padded = (self.tensor_sums(nbytes) + SAVE_ALIGN - 1) // SAVE_ALIGN * SAVE_ALIGN
        base = torch.cumsum(padded, 0) - padded
        offsets = base[self.tensor_of_chunk] + self.before_in_tensor(nbytes)
        return offsets, padded.sum()

    def unpack(self, bits, index):
        """The mask of tensor `index` as a bool tensor of its shape."""
        first, n = self.first_chunk[index], self.numels[index]
        packed = bits[first * CHUNK_BYTES: first * CHUNK_BYTES + (n + 7) // 8]
        flat = ((packed.unsqueeze(1) >> _BIT_SHIFTS.to(bits.device)) & 1).bool().reshape(-1)
        return flat[:n].reshape(self.shapes[index])

    def pack(self, masks):
        """Packed bits and per-chunk popcounts of a list of bool masks (one per tensor)."""
        padded = torch.zeros(self.total_chunks * CHUNK, dtype=torch.bool, device=self.device)
        for m, first, n in zip(masks, self.first_chunk, self.numels):
            padded[first * CHUNK: first * CHUNK + n] = m.reshape(-1)
        weights = (1 << _BIT_SHIFTS.to(torch.int32)).to(self.device)
        bits = (padded.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)
        counts = padded.view(self.total_chunks, CHUNK).sum(1, dtype=torch.int32)
        return bits, counts
