"""Two processes, gloo, CPU: `sharpness_step` under DistributedDataParallel against the
single-process computation each mode should equal.

per replica (default): each replica perturbs with its own first-pass gradient (its own mask),
the second-pass gradients are averaged.  synchronized: the first pass is all-reduced too, so
the step is the single-process step over the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsam_kernels import FSAM
from fsam_kernels.optim.micro_batches import sharpness_step
from spawned import run_in_group

WORLD, MICRO, STEPS = 2, 2, 3
KW = dict(rho=0.2, sparsity=0.7, mask_interval=2, lr=1e-2)
MAX_NORM = {"global": 0.5, "componentwise": 0.1}  # each clips some steps' gradients


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(), torch.nn.Linear(33, 17), torch.nn.Tanh(),
                               torch.nn.Linear(17, 3))


def micro_batches(step, rank):
    """Rank `rank`'s micro-batches of step `step` (each rank sees its own examples)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return [(torch.randn(5, 9, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(MICRO)]


def loss_of(model, b):
    return torch.nn.functional.cross_entropy(model(b[0]), b[1])


def worker(rank, init_file, out_dir, sync, clip):
    run_in_group(train_replica, rank, out_dir, sync, clip, rank=rank, world=WORLD, init_method=f"file://{init_file}")


def train_replica(rank, out_dir, sync, clip):
    torch.set_num_threads(1)
    model = mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FSAM(model.named_parameters(), torch.optim.AdamW, **KW)
    for step in range(STEPS):
        sharpness_step(opt, micro_batches(step, rank), lambda b: loss_of(ddp, b), model=ddp,
                       max_grad_norm=MAX_NORM[clip], clip=clip, sync_perturbation=sync)
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "mask": opt.mask_bits.clone()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def run_ddp(tmp_path, sync, clip="global"):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), sync, clip), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_params_close(params, model):
    for a, b in zip(params, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def clip_by_hand(model, max_norm, clip):
    """torch's clip_grad_norm_ over the whole gradient, or over each tensor alone; how many it clipped."""
    groups = [list(model.parameters())] if clip == "global" else [[p] for p in model.parameters()]
    return sum(int(torch.nn.utils.clip_grad_norm_(group, max_norm) > max_norm) for group in groups)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("clip", ["global", "componentwise"])
def test_synchronized_perturbation_is_the_whole_batch_step(tmp_path, clip):
    """...and the clip, of either mode, acts on the all-reduced second-pass gradient."""
    ranks = run_ddp(tmp_path, sync=True, clip=clip)
    model = mlp()
    opt = FSAM(model.named_parameters(), torch.optim.AdamW, **KW)
    clipped = 0
    for step in range(STEPS):
        window = [b for r in range(WORLD) for b in micro_batches(step, r)]
        for b in window:
            (loss_of(model, b) / len(window)).backward()
        opt.first_step(zero_grad=True)
        for b in window:
            (loss_of(model, b) / len(window)).backward()
        clipped += clip_by_hand(model, MAX_NORM[clip], clip)
        opt.second_step(zero_grad=True)
    assert clipped > 0  # the clip did something
    assert torch.equal(ranks[0]["mask"], ranks[1]["mask"])  # one perturbation for all replicas
    assert torch.equal(ranks[0]["mask"], opt.mask_bits)
    for r in ranks:
        assert_params_close(r["params"], model)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_per_replica_perturbation(tmp_path):
    ranks = run_ddp(tmp_path, sync=False)
    models = [mlp() for _ in range(WORLD)]
    opts = [FSAM(m.named_parameters(), torch.optim.AdamW, **KW) for m in models]
    for step in range(STEPS):
        second = []
        for r, (m, opt) in enumerate(zip(models, opts)):  # each replica: its own first pass and perturbation
            for b in micro_batches(step, r):
                (loss_of(m, b) / MICRO).backward()
            opt.first_step(zero_grad=True)
            for b in micro_batches(step, r):
                (loss_of(m, b) / MICRO).backward()
            second.append([p.grad for p in m.parameters()])
            opt.restore()
        for m, opt in zip(models, opts):  # the all-reduce: every replica steps with the mean
            for p, *gs in zip(m.parameters(), *second):
                p.grad = sum(gs) / WORLD
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            opt.second_step(zero_grad=True)
    assert not torch.equal(ranks[0]["mask"], ranks[1]["mask"])  # each replica its own mask
    for r, (m, opt) in enumerate(zip(models, opts)):
        assert torch.equal(ranks[r]["mask"], opt.mask_bits)
        assert_params_close(ranks[r]["params"], m)
    assert_params_close(ranks[0]["params"], models[1])  # the weights stay the same on every replica


def trainer_worker(rank, port, out_dir, sync):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "integrations"))  # also when run on its own
    from test_trainer import trainer
    destroy = dist.destroy_process_group

    def destroy_and_mark():  # FSAMTrainer must destroy the group before the interpreter finalizes
        destroy()
        pathlib.Path(out_dir, f"destroyed{rank}").touch()
    dist.destroy_process_group = destroy_and_mark
    t = trainer(pathlib.Path(out_dir), ddp_backend="gloo", max_steps=3, gradient_accumulation_steps=2,
                sync_perturbation=sync)
    t.train()
    assert isinstance(t.model_wrapped, torch.nn.parallel.DistributedDataParallel) and t.args.world_size == WORLD
    torch.save({"params": [p.detach().clone() for p in t.model.parameters()],
                "mask": t.sharpness_optimizer.mask_bits.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("sync", [False, True])
def test_trainer_under_ddp(tmp_path, sync):
    """FSAMTrainer in 2 processes: the replicas keep equal weights; per replica, each its own mask.
    Each process destroys its process group at exit (FSAMTrainer registers that): a gloo group
    left to interpreter finalization can abort the process after training."""
    pytest.importorskip("accelerate")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(trainer_worker, args=(port, str(tmp_path), sync), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert torch.equal(a["mask"], b["mask"]) == sync
    assert all((tmp_path / f"destroyed{r}").exists() for r in range(WORLD))
