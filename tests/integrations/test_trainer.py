"""FSAMTrainer on a tiny random-weight BERT: the Trainer's step against the optimizer's own API
by hand (accumulation, clipping), bf16 autocast and bf16 parameters, checkpoint resume equal
to an uninterrupted run, logging, an fp16 overflow through the Trainer's GradScaler."""
import inspect

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from fsam_kernels import FSAM, SAM  # noqa: E402
from fsam_kernels.integrations.transformers import FSAMTrainer  # noqa: E402
from models import assert_bits_equal, batch, overflow_backward, snapshot, tiny_bert  # noqa: E402

FSAM_KW = dict(rho=0.05, sparsity=0.8, mask_interval=3, backend="reference")


class Examples(torch.utils.data.Dataset):
    def __init__(self, n=32):
        b = batch(0, size=n)
        self.items = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# transformers 5 samples in order when asked; 4.x has no such option, and its Trainer is told
# through _get_train_sampler (the tests compare the Trainer's steps with steps taken by hand).
SEQUENTIAL_OPTION = "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=3,
                lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True, disable_tqdm=True,
                **({"train_sampling_strategy": "sequential"} if SEQUENTIAL_OPTION else {}))
    return TrainingArguments(**{**base, **kw})


if not SEQUENTIAL_OPTION:
    FSAMTrainer._get_train_sampler = lambda self, train_dataset=None: torch.utils.data.SequentialSampler(
        train_dataset if train_dataset is not None else self.train_dataset)


def trainer(tmp_path, model=None, sharpness="fsam", sharpness_kwargs=FSAM_KW, sync_perturbation=False,
            grad_clip="global", **kw):
    model = tiny_bert(0) if model is None else model
    # BERT's classification loss ignores num_items_in_batch, and the Trainer would then sum the
    # micro-batch means; this makes it average them (the same for every optimizer).
    model.accepts_loss_kwargs = False
    return FSAMTrainer(model=model, args=args(tmp_path, **kw), train_dataset=Examples(), sharpness=sharpness,
                       sharpness_kwargs=sharpness_kwargs if sharpness else None, sync_perturbation=sync_perturbation,
                       grad_clip=grad_clip)


def clip_by_hand(model, max_norm, mode):
    """torch's clip_grad_norm_ over the whole gradient, or over each tensor alone: whether it clipped."""
    groups = [list(model.parameters())] if mode == "global" else [[p] for p in model.parameters()
                                                                   if p.grad is not None]
    return sum(int(torch.nn.utils.clip_grad_norm_(g, max_norm) > max_norm) for g in groups) > 0


def windows(step):
    items = Examples().items
    window = [items[8 * step + 4 * i: 8 * step + 4 * i + 4] for i in range(2)]
    return [{k: torch.stack([x[k] for x in mb]) for k in mb[0]} for mb in window]


def decay_groups(t, model):
    named = list(model.named_parameters())
    decay = set(t.get_decay_parameter_names(model))
    return [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]


@pytest.mark.parametrize("mode", ["global", "componentwise"])
def test_step_is_fsam_by_hand(tmp_path, mode):
    """Accumulation 2: perturb once from the window's gradient, the second pass over the same
    micro-batches, clip the second-pass gradient (once, as a whole or per tensor), AdamW with the
    Trainer's decay groups."""
    c = {"global": 0.3, "componentwise": 0.05}[mode]  # each clips in this run
    t = trainer(tmp_path, gradient_accumulation_steps=2, grad_clip=mode, max_grad_norm=c)
    t.train()
    model = tiny_bert(0)
    opt = FSAM(decay_groups(t, model), torch.optim.AdamW, lr=1e-3, **FSAM_KW)
    clipped = 0
    for step in range(3):
        window = windows(step)
        for mb in window:
            (model(**mb).loss / 2).backward()
        opt.first_step(zero_grad=True)
        for mb in window:
            (model(**mb).loss / 2).backward()
        clipped += clip_by_hand(model, c, mode)
        opt.second_step(zero_grad=True)
    assert clipped  # the clip mattered in this run
    for (n, a), b in zip(t.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert t.sharpness_optimizer._step_count == 3
    assert all(h["grad_norm"] > 0 for h in t.state.log_history if "loss" in h)


def test_adamw_with_componentwise_clipping_is_by_hand(tmp_path):
    """method=None keeps the Trainer's AdamW; the clip is still component-wise, once a window."""
    t = trainer(tmp_path, sharpness=None, gradient_accumulation_steps=2, grad_clip="componentwise", max_grad_norm=0.1)
    t.train()
    model = tiny_bert(0)
    opt = torch.optim.AdamW([{k: v for k, v in g.items()} | {"params": [p for _, p in g["params"]]}
                             for g in decay_groups(t, model)], lr=1e-3)
    clipped = 0
    for step in range(3):
        for mb in windows(step):
            (model(**mb).loss / 2).backward()
        clipped += clip_by_hand(model, 0.1, "componentwise")
        opt.step()
        opt.zero_grad()
    assert clipped
    for (n, a), b in zip(t.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="grad_clip must be one of"):
        trainer(tmp_path, grad_clip="layerwise")


def test_logs_and_schedulers(tmp_path):
    t = trainer(tmp_path, lr_scheduler_type="linear", max_steps=4)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert all(h["mask_density"] == pytest.approx(0.2, abs=1e-3) for h in logs)
    assert all(h["skipped_perturbations"] == 0 for h in logs)
    lrs = [h["learning_rate"] for h in logs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]
    assert t.sharpness_optimizer.param_groups[0]["lr"] == 0.0  # the linear schedule reached its end


def test_sam_and_default_optimizer(tmp_path):
    sam = trainer(tmp_path, sharpness="sam", sharpness_kwargs={"rho": 0.05, "backend": "reference"})
    sam.train()
    assert isinstance(sam.sharpness_optimizer, SAM)
    assert all(h.get("mask_density", 1.0) == 1.0 for h in sam.state.log_history)
    plain = trainer(tmp_path, sharpness=None)
    plain.train()
    assert plain.sharpness_optimizer is None
    assert not any("mask_density" in h for h in plain.state.log_history)
    differ = [not torch.equal(a, b) for a, b in zip(sam.model.parameters(), plain.model.parameters())]
    assert any(differ)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sharpness must be"):
        trainer(tmp_path, sharpness="asam")
    with pytest.raises(ValueError, match="base optimizer's"):
        trainer(tmp_path, sharpness_kwargs={"lr": 0.1}).create_optimizer()
    with pytest.raises(TypeError, match="sharpness_kwargs"):
        FSAMTrainer(model=tiny_bert(0), args=args(tmp_path), sharpness_kwargs=[("rho", 1)])


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    t = trainer(tmp_path, bf16=True, max_steps=2)
    before = snapshot(t.model)
    out_dtypes = set()
    t.model.classifier.register_forward_hook(lambda m, i, out: out_dtypes.add(out.dtype))
    t.train()
    assert out_dtypes == {torch.bfloat16}  # both passes ran under autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())
    assert t.sharpness_optimizer.skipped_perturbations == 0


def test_bf16_parameters(tmp_path):
    t = trainer(tmp_path, model=tiny_bert(0, torch.bfloat16), max_steps=2, learning_rate=1e-2)
    before = snapshot(t.model)
    t.train()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in t.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


@pytest.mark.parametrize("fisher", ["batch", "ema"])
def test_resume_equals_uninterrupted(tmp_path, fisher):
    kw = dict(max_steps=5, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2,
              lr_scheduler_type="linear")
    kwargs = {**FSAM_KW, "fisher": fisher}
    whole = trainer(tmp_path / "whole", sharpness_kwargs=kwargs, **kw)
    whole.train()
    resumed = trainer(tmp_path / "resumed", sharpness_kwargs=kwargs, **kw)
    steps = []
    resumed.add_callback(type("Count", (TrainerCallback,), {"on_step_end": lambda self, a, state, c, **k:
                                                             steps.append(state.global_step)})())
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert steps == [3, 4, 5]  # it did resume
    assert_bits_equal(snapshot(resumed.model), snapshot(whole.model))
    a, b = whole.sharpness_optimizer, resumed.sharpness_optimizer
    assert torch.equal(a.mask_bits, b.mask_bits) and a._step_count == b._step_count == 5


def test_fp16_overflow_through_the_trainers_scaler(tmp_path):
    """The Trainer's GradScaler (CPU here, where accelerate makes none for fp16): a first pass
    that overflows skips the perturbation and the base step, the scale backs off."""
    t = trainer(tmp_path, max_steps=3, max_grad_norm=0.0)
    t.accelerator.scaler = sc = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    seen = {}
    overflow_backward(t.model, at_call=2)  # backward 2 is step 1's first pass

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = (snapshot(t.model), sc.get_scale())
    t.add_callback(Watch())
    t.train()
    assert_bits_equal(seen[2][0], seen[1][0])  # step 2 (the overflow) changed nothing
    assert seen[2][1] == seen[1][1] / 2
    assert any(not torch.equal(seen[3][0][n], seen[2][0][n]) for n in seen[2][0])
    assert t.sharpness_optimizer.skipped_perturbations == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_hand_built_optimizer(tmp_path):
    model = tiny_bert(0)
    model.accepts_loss_kwargs = False
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend="reference")
    t = FSAMTrainer(model=model, args=args(tmp_path), train_dataset=Examples(), sharpness=None,
                    optimizers=(opt, None))
    t.train()
    assert t.sharpness_optimizer is opt and opt._step_count == 3
    with pytest.raises(ValueError, match="not SAM/FSAM"):
        FSAMTrainer(model=model, args=args(tmp_path), train_dataset=Examples(),
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's fp16 GradScaler needs a GPU")
def test_fp16_through_accelerate_on_cuda(tmp_path):
    """The real mixed-precision path: accelerate's CUDA GradScaler, unscale of the first pass
    before first_step, clipping of the second-pass gradient; an overflow skips the step."""
    t = trainer(tmp_path, model=tiny_bert(0).cuda(), use_cpu=False, fp16=True, max_steps=4, max_grad_norm=0.3,
                sharpness_kwargs={**FSAM_KW, "backend": "auto"})
    overflow_backward(t.model, at_call=2)  # step 1's first pass
    seen = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = (snapshot(t.model), t.accelerator.scaler.get_scale())
    t.add_callback(Watch())
    t.train()
    assert isinstance(t.accelerator.scaler, torch.amp.GradScaler) and t.sharpness_optimizer.backend != "reference"
    assert_bits_equal(seen[2][0], seen[1][0]) and seen[2][1] == seen[1][1] / 2
    assert any(not torch.equal(seen[4][0][n], seen[2][0][n]) for n in seen[2][0])
    assert t.sharpness_optimizer.skipped_perturbations == 1
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.model.parameters())


def test_methods_are_chosen_by_name_from_a_registry(tmp_path):
    from fsam_kernels.integrations import transformers as integration

    class RecordingSAM(SAM):
        built = 0

        def __init__(self, *args, **kwargs):
            RecordingSAM.built += 1
            super().__init__(*args, **kwargs)
    integration.register_method("recording-sam", RecordingSAM)
    try:
        model = tiny_bert(0)
        model.accepts_loss_kwargs = False
        t = integration.FineTuningTrainer(model=model, args=args(tmp_path), train_dataset=Examples(),
                                          method="recording-sam", method_kwargs={"rho": 0.05, "backend": "reference"})
        t.train()
        assert RecordingSAM.built == 1 and isinstance(t.method_optimizer, RecordingSAM)
        assert t.sharpness_optimizer is t.method_optimizer and t.method_optimizer._step_count == 3
    finally:
        del integration.METHODS["recording-sam"]
    assert integration.FSAMTrainer is integration.FineTuningTrainer
    with pytest.raises(ValueError, match="method must be one of"):
        integration.FineTuningTrainer(model=tiny_bert(0), args=args(tmp_path), method="recording-sam")
    with pytest.raises(TypeError, match="not both"):
        integration.FineTuningTrainer(model=tiny_bert(0), args=args(tmp_path), method="sam", sharpness="fsam")
    with pytest.raises(TypeError, match="register_method"):
        integration.register_method("x", SAM(tiny_bert(0).parameters(), torch.optim.SGD, lr=0.1))


def test_pac_tuning_is_by_hand(tmp_path):
    """method="pac": K estimated once from the training set's per-example losses (dropout off),
    then per window perturb, both micro-batches at the noisy weights, restore with the stage-1
    gradients, the Trainer's clip, the updates; num_examples defaults to the training set's size."""
    from fsam_kernels import PACTuning
    from fsam_kernels.optim.pac import estimate_k
    pac_kw = dict(stage1_steps=2, k_samples=2, backend="reference")
    t = trainer(tmp_path, sharpness="pac", sharpness_kwargs=pac_kw, gradient_accumulation_steps=2)
    t.train()
    opt = t.method_optimizer
    assert isinstance(opt, PACTuning) and opt.num_examples == 32 and opt.stage == 2 and opt._step == 3
    logs = [h for h in t.state.log_history if "loss" in h]
    assert all(h["skipped_steps"] == 0 and "mask_density" not in h for h in logs)
    assert [h["pac_stage"] for h in logs] == [1, 2, 2]  # logged after each step
    assert logs[-1]["noise_std"] == pytest.approx(float(torch.cat([s.exp().reshape(-1) for s in opt.log_stds]).mean()))
    model = tiny_bert(0)
    by_hand = PACTuning(decay_groups(t, model), torch.optim.AdamW, lr=1e-3, num_examples=32, **pac_kw)
    items = Examples().items
    data = [{k: torch.stack([x[k] for x in items[i: i + 4]]) for k in items[0]} for i in range(0, 32, 4)]

    def losses(m, b):
        return torch.nn.functional.cross_entropy(m(input_ids=b["input_ids"]).logits, b["labels"], reduction="none")

    model.eval()
    table = estimate_k(model, losses, data, params=by_hand._params, samples=2, progress=False)
    model.train()
    assert table.values == pytest.approx(opt.k_table.values, rel=1e-6)  # the Trainer's forward rounds apart
    by_hand.k_table = opt.k_table
    for step in range(3):
        by_hand.perturb()
        for mb in windows(step):
            (model(**mb).loss / 2).backward()
        by_hand.restore()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        by_hand.step()
        by_hand.zero_grad()
    for (n, a), b in zip(t.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(NotImplementedError, match="GradScaler"):
        from fsam_kernels.optim.micro_batches import noise_passes
        noise_passes(by_hand, [windows(0)[0]], lambda b: model(**b).loss.backward(), scaler=object())
