"""torch.library.opcheck on every fsam op (schema, fake impl, autograd registration, AOT
dispatch), and the ops under torch.compile."""
import pytest
import torch

import fsam_kernels
from fsam_kernels import ops
from conftest import devices

pytestmark = pytest.mark.skipif(not fsam_kernels.EXTENSION_LOADED, reason="fsam_kernels._C not built")


def inputs(device):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device) for s in [(5000,), (3, 7), (64,)]]
    grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
    bits, counts = torch.ops.fsam.topk_mask(grads, 500, True)
    offsets, saved = ops.save_layout(params, counts)
    return params, grads, bits, offsets, saved


@pytest.mark.parametrize("device", devices())
def test_opcheck_all_ops(device):
    params, grads, bits, offsets, saved = inputs(device)
    scale = torch.tensor(0.1, device=device)
    fisher = [torch.rand(p.shape, device=device) for p in params]
    torch.library.opcheck(torch.ops.fsam.topk_mask.default, (grads, 500, True))
    torch.library.opcheck(torch.ops.fsam.topk_mask.default, (fisher, 0, False))
    torch.library.opcheck(torch.ops.fsam.fisher_accumulate_.default, (fisher, [grads[0], None, grads[2]], 0.9, 0.1))
    torch.library.opcheck(torch.ops.fsam.fisher_accumulate_.default,
                          (fisher, grads, 0.9, 0.1, torch.tensor(0.0, device=device)))
    torch.library.opcheck(torch.ops.fsam.grad_sumsq.default, (params, grads, bits, True, 0.01))
    torch.library.opcheck(torch.ops.fsam.grad_sumsq.default, (params, [None, grads[1], None], None))
    torch.library.opcheck(torch.ops.fsam.masked_perturb_.default,
                          (params, grads, bits, offsets, saved, scale, False, 0.0))
    torch.library.opcheck(torch.ops.fsam.masked_restore_.default, (params, bits, offsets, saved))


@pytest.mark.parametrize("device", devices())
def test_ops_under_torch_compile(device):
    params, grads, bits, offsets, saved = inputs(device)
    original = [p.clone() for p in params]

    def sam_round_trip(params, grads, bits, offsets, saved):
        stats = torch.ops.fsam.grad_sumsq(params, grads, bits, False, 0.0)
        scale = 0.05 / (stats[0].sqrt() + 1e-12)
        torch.ops.fsam.masked_perturb_(params, grads, bits, offsets, saved, scale, False, 0.0)
        moved = torch.stack([p.sum() for p in params])
        torch.ops.fsam.masked_restore_(params, bits, offsets, saved)
        return stats, moved

    compiled = torch.compile(sam_round_trip, backend="aot_eager", fullgraph=True)
    stats, moved = compiled(params, grads, bits, offsets, saved)
    expected = ops.grad_sumsq(original, grads, mask_bits=bits)
    torch.testing.assert_close(stats, expected)
    assert not torch.equal(moved, torch.stack([p.sum() for p in original]))
    for p, o in zip(params, original):
        assert torch.equal(p, o)


def test_triton_ops_share_the_cpp_schemas():
    from fsam_kernels._schemas import SCHEMAS
    from fsam_kernels.triton_kernels import library  # noqa: F401
    for name, schema in SCHEMAS.items():
        parsed = torch._C.parse_schema(f"fsam::{name}{schema}")
        assert str(getattr(torch.ops.fsam, name).default._schema) == str(parsed)
        assert str(getattr(torch.ops.fsam_triton, name).default._schema) == str(parsed).replace("fsam::", "fsam_triton::")
