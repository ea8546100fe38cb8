"""FSDP2 (fully_shard) on CPU with gloo, 2 and 3 processes (3 makes the shards uneven, some
empty): every optimizer computes what it computes on one process over the whole model.

One spawn per world size runs every case (fsdp_results) and saves what the processes hold; the
tests compare it with the single-process runs here.  Each process trains on its share of every
batch, so FSDP's averaged gradient is the whole batch's (to rounding)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsam_kernels import FSAM, SAM, PACTuning, clip_grad_norm_componentwise_
from fsam_kernels.optim import checkpoint
from fsam_kernels.optim.pac import KTable
from fsam_kernels.optim.micro_batches import sharpness_step
from models import tiny_bert
from spawned import run_in_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

BATCH, STEPS = 12, 3  # 12 splits evenly over 2 and 3 processes
SAVED_AT, RESUMED = 1, 3  # checkpoints: after step 1 (PAC in stage 1, FSAM between masks), then 3 more steps
CHECKPOINTED = ("sam", "fsam-ema", "fsam-samples", "pac")
# x = exp(mean b) = (mean |w|)^2 starts near 3e-4: on a slope of K, so that b's first gradient is not
# all rounding (at step 0 its KL part is 0, which Adam would turn into steps of +-lr either way)
K_TABLE = KTable([1e-5, 0.01, 0.1], [0.01, 0.03, 0.2])
OPTIMIZERS = {
    "sam": lambda params: SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "asam": lambda params: SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9),
    "fsam-batch": lambda params: FSAM(params, torch.optim.SGD, rho=0.1, sparsity=0.8, mask_interval=2, lr=0.1, momentum=0.9),
    "fsam-ema": lambda params: FSAM(params, torch.optim.SGD, rho=0.1, sparsity=0.8, mask_interval=2, lr=0.1,
                                    momentum=0.9, fisher="ema", pool="fsam4plm"),
    "fsam-samples": lambda params: FSAM(params, torch.optim.SGD, rho=0.1, sparsity=0.8, fisher="samples",
                                        lr=0.1, momentum=0.9, renormalize=True),
    # n large: the bound's w-gradient e^(-2b) (w - w0) / (n gamma), with e^(-2b) ~ 1e7 here, would
    # scale the rounding of the shards' sums to beyond any tolerance
    "pac": lambda params: PACTuning(params, torch.optim.SGD, num_examples=100_000, stage1_steps=2, seed=5,
                                    k_table=K_TABLE, lr=0.1, momentum=0.9, freeze=()),
}


def batch(step, rank=0, world=1):
    """Step `step`'s examples: rank `rank`'s share of the whole batch."""
    g = torch.Generator().manual_seed(1000 + step)
    ids, labels = torch.randint(0, 97, (BATCH, 10), generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    share = BATCH // world
    return {"input_ids": ids[rank * share:(rank + 1) * share], "labels": labels[rank * share:(rank + 1) * share]}


def backward(model, step, rank=0, world=1):
    model(**batch(step, rank, world)).loss.backward()


def train(model, opt, steps, rank=0, world=1, start=0):
    for step in range(start, start + steps):
        if isinstance(opt, PACTuning):
            opt.perturb()
            backward(model, step, rank, world)
            opt.step()
        else:
            if isinstance(opt, FSAM) and opt.perturbation.fisher == "samples":
                for half in range(2):  # two Fisher samples, then the mask
                    backward(model, 100 * step + half, rank, world)
                    opt.accumulate_fisher()
                    opt.zero_grad()
                opt.update_mask()
            backward(model, step, rank, world)
            opt.first_step(zero_grad=True)
            backward(model, step, rank, world)
            opt.second_step()
        opt.zero_grad()


MAX_NORM = {"global": 0.1, "componentwise": 0.05}  # the whole gradient has norm 0.3, tensors up to 0.23


def step_loop(model, opt, clip, rank=0, world=1):
    """sharpness_step over two micro-batches a step, clipping the second-pass gradient."""
    for step in range(STEPS):
        micro = [batch(10 * step + i, rank, world) for i in range(2)]
        sharpness_step(opt, micro, lambda b: model(**b).loss, model=model, max_grad_norm=MAX_NORM[clip], clip=clip)


def tie_gradients(model, seed=3):
    """Whole-model gradients of few distinct values (|g| in {0, 1, 2, 3}): the k-th largest is tied
    across many shard boundaries."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-3, 4, p.shape, generator=g).float() for p in model.parameters()]


# ---- the processes --------------------------------------------------------------------------

def sharded_model(mesh, seed=0):
    from torch.distributed.fsdp import fully_shard
    model = tiny_bert(seed)
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(tensors):
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]


def resume(path, model, make, rank=0, world=1):
    """Load the checkpoint at `path` into `model` and a new optimizer, train on; the parameters."""
    opt = make(model.named_parameters())
    checkpoint.load(path, model, opt)
    train(model, opt, RESUMED, rank, world, start=SAVED_AT)
    return full(model.parameters())


def worker(rank, world, init_file, out_dir):
    run_in_group(every_case, rank, world, out_dir, rank=rank, world=world, init_method=f"file://{init_file}")


def every_case(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    # the exact global mask, ties included: from |g| (update_mask) and from F (first_step, "ema")
    for fisher in ("batch", "ema"):
        model = sharded_model(mesh)
        opt = FSAM(model.named_parameters(), torch.optim.SGD, sparsity=0.7, fisher=fisher, lr=0.0)
        for p, g in zip(model.parameters(), tie_gradients(tiny_bert())):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        if fisher == "batch":
            opt.update_mask()
        else:
            opt.first_step()
            opt.second_step()
        out[f"mask-{fisher}"] = [opt.gather_mask(p) for p in model.parameters()]
        out[f"local-{fisher}"] = [opt.mask_of(p).shape == p.to_local().shape for p in model.parameters()]
    # training: the parameters after a few steps
    for name, make in OPTIMIZERS.items():
        model = sharded_model(mesh)
        opt = make(model.named_parameters())
        train(model, opt, STEPS, rank, world)
        out[name] = full(model.parameters())
    # checkpoints: resumed here, and from the single-process ones (another world size)
    for name in CHECKPOINTED:
        make = OPTIMIZERS[name]
        model = sharded_model(mesh)
        opt = make(model.named_parameters())
        train(model, opt, SAVED_AT, rank, world)
        checkpoint.save(os.path.join(out_dir, f"{name}-world"), model, opt)
        train(model, opt, RESUMED, rank, world, start=SAVED_AT)
        out[f"uninterrupted-{name}"] = full(model.parameters())
        out[f"resumed-{name}"] = resume(os.path.join(out_dir, f"{name}-world"), sharded_model(mesh, seed=1), make,
                                        rank, world)
        out[f"from-single-{name}"] = resume(os.path.join(out_dir, f"{name}-single"), sharded_model(mesh, seed=1),
                                            make, rank, world)
    # sharpness_step: accumulation, both clips; per-replica perturbation does not exist here
    for clip in MAX_NORM:
        model = sharded_model(mesh)
        opt = OPTIMIZERS["fsam-batch"](model.named_parameters())
        step_loop(model, opt, clip, rank, world)
        out[f"step-{clip}"] = full(model.parameters())
    try:
        sharpness_step(opt, [batch(0, rank, world)], lambda b: model(**b).loss, sync_perturbation=False)
    except ValueError as e:
        out["per-replica"] = str(e)
    # component-wise clipping of the sharded gradient
    model = sharded_model(mesh)
    backward(model, 0, rank, world)
    out["clip-norms"] = clip_grad_norm_componentwise_(model.parameters(), 0.05)
    out["clip-grads"] = full([p.grad for p in model.parameters()])
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "out.pt"))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def fsdp_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp{world}")
    for name in CHECKPOINTED:  # what the processes resume from on another world size
        model = tiny_bert()
        opt = OPTIMIZERS[name](model.named_parameters())
        train(model, opt, SAVED_AT)
        checkpoint.save(str(tmp / f"{name}-single"), model, opt)
    mp.spawn(worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    out = torch.load(tmp / "out.pt", weights_only=False)
    out["dir"] = tmp
    return out


# ---- the comparisons ------------------------------------------------------------------------

@pytest.mark.parametrize("fisher", ["batch", "ema"])
def test_gathered_mask_is_the_single_process_mask(fsdp_results, fisher):
    model = tiny_bert()
    opt = FSAM(model.named_parameters(), torch.optim.SGD, sparsity=0.7, fisher=fisher, lr=0.0)
    for p, g in zip(model.parameters(), tie_gradients(model)):
        p.grad = g
    if fisher == "batch":
        opt.update_mask()
    else:
        opt.first_step()
        opt.second_step()
    masks = [opt.mask_of(p) for p in model.parameters()]
    scores = [g.abs() for g in tie_gradients(model)]
    kth = torch.cat([s.reshape(-1) for s in scores]).sort(descending=True).values[opt.k - 1]
    ties = sum(int((s == kth).sum()) for s in scores)
    assert 0 < sum(int(m[s == kth].sum()) for m, s in zip(masks, scores)) < ties  # some of the ties taken
    assert all(fsdp_results[f"local-{fisher}"])  # mask_of gives the local shard's
    for got, expected in zip(fsdp_results[f"mask-{fisher}"], masks):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_equals_the_single_process_run(fsdp_results, name):
    model = tiny_bert()
    opt = OPTIMIZERS[name](model.named_parameters())
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, STEPS)
    for got, expected, start in zip(fsdp_results[name], model.parameters(), before):
        torch.testing.assert_close(got, expected.detach(), rtol=2e-5, atol=2e-6)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_componentwise_clipping_of_shards(fsdp_results):
    model = tiny_bert()
    backward(model, 0)
    norms = clip_grad_norm_componentwise_(model.parameters(), 0.05)
    torch.testing.assert_close(fsdp_results["clip-norms"], norms, rtol=1e-6, atol=1e-10)
    assert (norms > 0.05).any()
    for got, p in zip(fsdp_results["clip-grads"], model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_resumes(fsdp_results, name):
    """Bit-exactly on the same world size; from and to one process, as the single-process run does
    (to rounding)."""
    assert all(torch.equal(a, b) for a, b in zip(fsdp_results[f"resumed-{name}"],
                                                  fsdp_results[f"uninterrupted-{name}"]))
    model = tiny_bert()
    train(model, OPTIMIZERS[name](model.named_parameters()), SAVED_AT + RESUMED)
    from_sharded = resume(str(fsdp_results["dir"] / f"{name}-world"), tiny_bert(seed=1), OPTIMIZERS[name])
    for got, resumed, expected in zip(fsdp_results[f"from-single-{name}"], from_sharded, model.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(resumed, expected.detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("clip", list(MAX_NORM))
def test_sharpness_step_equals_the_single_process_step(fsdp_results, clip):
    model = tiny_bert()
    step_loop(model, OPTIMIZERS["fsam-batch"](model.named_parameters()), clip)
    for got, expected in zip(fsdp_results[f"step-{clip}"], model.parameters()):
        torch.testing.assert_close(got, expected.detach(), rtol=2e-5, atol=2e-6)
    assert "per replica" in fsdp_results["per-replica"]


# ---- the Trainer: accelerate enables FSDP on GPUs only, so this runs on a GPU machine ---------

def trainer_worker(rank, port, out_dir):
    import pathlib
    import sys
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "integrations"))
    from test_trainer import trainer
    t = trainer(pathlib.Path(out_dir), use_cpu=False, fsdp=True, max_steps=3, gradient_accumulation_steps=2,
                fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
                grad_clip="componentwise", max_grad_norm=0.05)
    t.train()
    opt = t.method_optimizer
    torch.save({"sharded": type(opt._sharding).__name__, "params": [p.cpu() for p in full(t.model.parameters())],
                "logs": [h for h in t.state.log_history if "loss" in h]}, os.path.join(out_dir, "trainer.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's FSDP plugin needs a GPU")
def test_trainer_under_fsdp2(tmp_path):
    """FineTuningTrainer with accelerate's FSDP2 at world size 1 (nccl): FSAM over DTensor
    parameters, component-wise clipping of their shards; the run follows the plain CPU run (to the
    rounding of a GPU against a CPU, which Adam and the mask's ties can enlarge entry by entry)."""
    pytest.importorskip("accelerate")
    import socket
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "integrations"))
    from test_trainer import trainer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(trainer_worker, args=(port, str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "trainer.pt", weights_only=False)
    assert got["sharded"] == "ShardedParams"
    assert len(got["logs"]) == 3 and all(h["mask_density"] == pytest.approx(0.2, abs=1e-3) for h in got["logs"])
    plain = trainer(tmp_path / "plain", max_steps=3, gradient_accumulation_steps=2, grad_clip="componentwise",
                    max_grad_norm=0.05)
    start = [p.detach().clone() for p in plain.model.parameters()]
    plain.train()
    moved = sum(float((p - s).abs().sum()) for p, s in zip(plain.model.parameters(), start))
    apart = sum(float((a - p).abs().sum()) for a, p in zip(got["params"], plain.model.parameters()))
    assert moved > 0 and apart < 0.05 * moved


def test_plain_gradient_of_a_sharded_parameter_is_refused():
    """Before anything changes; here on a 1-process mesh."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(refusal_worker, args=(port,), nprocs=1, join=True)


def refusal_worker(rank, port):
    run_in_group(refusals, rank=0, world=1, init_method=f"tcp://127.0.0.1:{port}")


def refusals():
    from torch.distributed.device_mesh import init_device_mesh
    model = sharded_model(init_device_mesh("cpu", (1,)))
    opt = OPTIMIZERS["fsam-batch"](model.named_parameters())
    before = full(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones(p.shape)
    with pytest.raises(RuntimeError, match="a plain tensor but its parameter as"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(full(model.parameters()), before))
    with pytest.raises(RuntimeError, match=r"parameters\[0\]\.grad is placed as a plain tensor but its parameter"):
        clip_grad_norm_componentwise_(model.parameters(), 1e-3)
    assert all(torch.equal(p.grad, torch.ones(p.shape)) for p in model.parameters())
    with pytest.raises(TypeError, match="is a plain tensor while others are DTensors"):
        SAM([next(model.parameters()), torch.nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=0.1)
