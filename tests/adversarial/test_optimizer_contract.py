"""The optimizers under attack (docs/errors.md): a parameter twice or sharing memory, non-finite
hyperparameters, exceptions in the middle of a step, and load_state_dict fed random single-field
mutations of a valid state, which must each be refused with nothing changed or continue the run
bit for bit like the unmutated state."""
import copy
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from fsam_kernels import FSAM, SAM, PACTuning  # noqa: E402
from conftest import all_backends  # noqa: E402
from models import train as two_pass_steps  # noqa: E402

CPU_BACKENDS = [b for b, d in all_backends() if d == "cpu"]
KINDS = {"FSAM": dict(sparsity=0.5, mask_interval=2, fisher="ema"), "SAM": {},
         "FSAM-exact": dict(sparsity=0.5, mask_interval=2, fisher="ema", exact_rollback=True)}


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def loss(m, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 7, generator=g), torch.randint(0, 5, (16,), generator=g)
    return torch.nn.functional.cross_entropy(m(x), y)


def make(kind, backend="reference", seed=0):
    m = model(seed)
    cls = SAM if kind == "SAM" else FSAM
    return m, cls(m.named_parameters(), torch.optim.AdamW, lr=1e-2, backend=backend, **KINDS[kind])


def train(m, opt, steps, start=0):
    two_pass_steps(m, opt, steps, start, loss)


def weights(m):
    return [p.detach().clone() for p in m.parameters()]


def same(a, b):
    """Bit-identical nested structures of tensors, numbers, strings and containers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel()
                        else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


# ---- parameters given twice, or sharing memory ------------------------------------------------

@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("kind", ["FSAM", "SAM"])
def test_a_parameter_twice_is_refused(kind):
    m = model()
    w, b = m[0].weight, m[0].bias
    cls = FSAM if kind == "FSAM" else SAM
    with pytest.raises(ValueError, match="parameter #2 is parameter #0 again"):
        cls([w, b, w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="0.weight"):
        cls([("0.weight", w), ("0.bias", b), ("again", w)], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError):
        cls([{"params": [w]}, {"params": [b, w]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="share memory"):  # two Parameters over one storage
        cls([w, torch.nn.Parameter(w.data[:3])], torch.optim.SGD, lr=0.1)
    opt = cls([w], torch.optim.SGD, lr=0.1)
    groups = copy.copy(opt.param_groups)
    for group in ({"params": [w]}, {"params": [b, b]}):
        with pytest.raises(ValueError):
            opt.add_param_group(group)
        assert opt.param_groups == groups and len(opt._params) == 1


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_pac_refuses_a_parameter_twice():
    m = model()
    with pytest.raises(ValueError, match="again"):
        PACTuning([m[0].weight, m[0].weight], torch.optim.SGD, num_examples=10, stage1_steps=1, lr=0.1)


# ---- hyperparameters -----------------------------------------------------------------------------

BAD_OPTIONS = [
    (FSAM, dict(rho=math.inf)), (FSAM, dict(rho=math.nan)), (FSAM, dict(eta=math.inf)),
    (FSAM, dict(norm_eps=math.nan)), (FSAM, dict(sparsity=math.nan)), (FSAM, dict(fisher_decay=math.inf)),
    (SAM, dict(rho=-0.1)), (SAM, dict(lr=math.nan)), (SAM, dict(lr=math.inf)), (SAM, dict(weight_decay=math.nan)),
    (SAM, dict(betas=(math.nan, 0.99))), (FSAM, dict(lr=torch.tensor(math.nan))),
    (PACTuning, dict(gamma=math.inf)), (PACTuning, dict(seed=2 ** 63)), (PACTuning, dict(seed=-1)),
    (PACTuning, dict(seed=1.5)), (PACTuning, dict(noise_lr=math.nan)), (PACTuning, dict(lr=math.inf)),
]


@pytest.mark.parametrize("cls,options", BAD_OPTIONS, ids=[f"{c.__name__}-{o}" for c, o in BAD_OPTIONS])
def test_non_finite_or_out_of_domain_options_are_refused_at_construction(cls, options):
    m = model()
    base = dict(lr=1e-3)
    extra = dict(num_examples=10, stage1_steps=1) if cls is PACTuning else {}
    with pytest.raises((ValueError, TypeError)):
        cls(m.named_parameters(), torch.optim.AdamW, **{**base, **extra, **options})


# ---- an exception inside a step ------------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["FSAM", "FSAM-exact", "SAM"])
def test_an_exception_in_the_closure_leaves_the_step_unbegun(backend, kind):
    m, opt = make(kind, backend)
    twin_m, twin = make(kind, backend)
    train(m, opt, 3)
    train(twin_m, twin, 3)
    before, state = weights(m), opt.state_dict()
    loss(m, 3).backward()

    def closure():
        loss(m, 3).backward()
        raise Boom()

    with pytest.raises(Boom):
        opt.step(closure)
    assert same(weights(m), before)
    if kind != "FSAM":  # FSAM's EMA keeps the first pass's squares without exact_rollback (docs/errors.md)
        assert same(opt.state_dict(), state)
    with pytest.raises(RuntimeError, match="second_step"):  # no pending second step
        opt.second_step()
    opt.zero_grad()
    if kind == "FSAM":
        opt.load_state_dict(state)
    train(m, opt, 2, start=3)
    train(twin_m, twin, 2, start=3)
    assert same(weights(m), weights(twin_m))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_exception_halfway_through_the_perturbation_restores_it(backend):
    m = model()
    opt = FSAM(m.named_parameters(), torch.optim.AdamW, lr=1e-2, sparsity=0.5, pool=lambda n, p: "0." in n,
               backend=backend)  # the first layer masked, the second dense
    train(m, opt, 2)
    before, state = weights(m), opt.state_dict()
    real = opt.roles._op["perturb_"]
    calls = []

    def failing(params, *args):
        calls.append(len(params))
        if len(calls) == 2:  # the masked role is perturbed; the dense one fails
            raise Boom()
        return real(params, *args)

    opt.roles._op["perturb_"] = failing
    loss(m, 2).backward()
    with pytest.raises(Boom):
        opt.first_step()
    assert len(calls) == 2 and same(weights(m), before)
    opt.roles._op["perturb_"] = real
    assert not opt.roles.perturbed and same(opt.state_dict(), state)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_rollback_puts_the_ema_back_after_a_failed_first_step(backend):
    m, opt = make("FSAM-exact", backend)
    train(m, opt, 3)
    before, state = weights(m), opt.state_dict()
    opt.roles.perturb = lambda *a, **k: (_ for _ in ()).throw(Boom())
    loss(m, 3).backward()
    with pytest.raises(Boom):
        opt.first_step()
    assert same(weights(m), before) and same(opt.state_dict(), state)  # the estimate included
    with pytest.raises(TypeError, match="exact_rollback"):
        FSAM(model().parameters(), torch.optim.SGD, lr=0.1, exact_rollback=1)


# ---- load_state_dict: random single-field mutations ------------------------------------------------

def leaves(tree, path=()):
    """Every (path, value) of a nested state dict, inner nodes included."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, path + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, path + (i,))


# Where a negative value is out of the domain (elsewhere it may be another valid state).
NON_NEGATIVE = ("step", "exp_avg_sq", "skipped", "chunk_counts", "fisher", "steps_since_mask", "samples")


def mutate(value, how, rng, path=()):
    """One mutation of a value that makes the state invalid or leaves its meaning (a missing
    entry, a wrong type, shape or dtype, NaN, a negative count, a flipped mask bit, ...); None
    when `how` does not apply to it."""
    if how == "delete":
        return "DELETE"
    if how == "none":
        return None if value is not None else "x"
    if how == "string":
        return "x"
    if isinstance(value, torch.Tensor):
        if how == "nan" and value.is_floating_point() and value.numel():
            out = value.clone()
            out.view(-1)[rng % value.numel()] = math.nan
            return out
        if how == "negative" and value.numel() and value.dtype != torch.bool and \
                any(k in NON_NEGATIVE for k in path if isinstance(k, str)):
            out = value.clone()
            out.view(-1)[rng % value.numel()] = -1
            return out
        if how == "flip" and value.dtype == torch.uint8 and value.numel():
            out = value.clone()
            out.view(-1)[rng % value.numel()] ^= 1 << (rng % 8)
            return out
        if how == "shape" and value.numel() > 1:
            return value.reshape(-1)[1:].clone()
        if how == "dtype" and value.is_floating_point():
            return value.to(torch.int64)
        if how == "transpose" and value.dim() == 2 and value.shape[0] != value.shape[1]:
            return value.t().contiguous()
        return None
    if isinstance(value, bool):  # a flag flipped is another valid configuration
        return None
    if isinstance(value, int):
        return {"negative": -1, "huge": 2 ** 70, "float": float(value) + 0.5}.get(how)
    if isinstance(value, float):
        return {"nan": math.nan, "negative": -1.0}.get(how)
    if isinstance(value, (list, tuple)) and value:
        if how == "shape":
            return type(value)(value[:-1])
        if how == "float":
            return type(value)(list(value) + [value[-1]])
    return None


def apply(state, path, new):
    state = copy.deepcopy(state)
    node = state
    for key in path[:-1]:
        node = node[key]
    if isinstance(node, tuple):  # tuples are rebuilt by their parent
        return None
    if new == "DELETE":
        if isinstance(node, list):
            del node[path[-1]]
        else:
            node.pop(path[-1])
    else:
        node[path[-1]] = new
    return state


HOWS = ["delete", "none", "string", "nan", "negative", "flip", "shape", "dtype", "transpose", "huge", "float"]
STATES = {}


def saved_state(kind):
    """A valid state after 3 steps (with a mask, Fisher EMA and Adam moments), made once."""
    if kind not in STATES:
        m, opt = make(kind)
        train(m, opt, 3)
        STATES[kind] = weights(m), opt.state_dict()
    return STATES[kind]


def continue_from(kind, state, w):
    """A fresh optimizer (one step taken, so it has its own state to keep), loaded with `state`
    and weights `w`: its weights after 2 more steps, or the exception with what it had before."""
    m, opt = make(kind, seed=1)
    train(m, opt, 1)
    mine, mine_w = opt.state_dict(), weights(m)
    try:
        opt.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as e:
        assert same(opt.state_dict(), mine) and same(weights(m), mine_w), "a refused load changed the optimizer"
        return e
    with torch.no_grad():
        for p, x in zip(m.parameters(), w):
            p.copy_(x)
    train(m, opt, 2, start=3)
    return weights(m)


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])
@given(st.sampled_from(sorted(KINDS)), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6))
def test_load_state_dict_refuses_or_continues_exactly(kind, which, how, rng):
    w, state = saved_state(kind)
    paths = [p for p, _ in leaves(state) if p]
    path = paths[which % len(paths)]
    value = dict(leaves(state))[path]
    hows = [h for h in HOWS if mutate(value, h, rng, path) is not None]
    how = hows[how % len(hows)]
    mutated = apply(state, path, mutate(value, how, rng, path))
    hypothesis.assume(mutated is not None)
    hypothesis.event(f"{kind} {how}")
    reference = continue_from(kind, state, w)
    assert not isinstance(reference, Exception)
    got = continue_from(kind, mutated, w)
    if not isinstance(got, Exception):
        assert same(got, reference), f"{kind}: {path} mutated by {how} was accepted and changed the run"


TARGETED = [  # each an invalid state: refused, whatever the fuzzer draws
    (("sharpness", "mask_bits"), "flip"), (("sharpness", "chunk_counts"), "negative"), (("sharpness", "k"), "huge"),
    (("sharpness", "k"), "float"), (("sharpness", "fisher", 0), "nan"), (("sharpness", "fisher", 0), "negative"),
    (("sharpness", "fisher", 1), "shape"), (("sharpness", "layout"), "shape"), (("sharpness", "steps_since_mask"),
                                                                               "negative"),
    (("sharpness", "type"), "string"), (("sharpness", "skipped"), "negative"), (("sharpness", "base_stateful"), "shape"),
    (("base", "state", 0, "exp_avg_sq"), "negative"), (("base", "state", 1, "exp_avg"), "transpose"),
    (("base", "state", 2), "delete"), (("base", "state", 0, "exp_avg"), "delete"),
    (("base", "param_groups", 0, "lr"), "negative"), (("base", "param_groups", 0, "betas"), "shape"),
]


@pytest.mark.parametrize("path,how", TARGETED, ids=[f"{'.'.join(map(str, p))}-{h}" for p, h in TARGETED])
def test_invalid_fsam_states_are_refused(path, how):
    w, state = saved_state("FSAM")
    value = dict(leaves(state))[path]
    got = continue_from("FSAM", apply(state, path, mutate(value, how, 5, path)), w)
    assert isinstance(got, (ValueError, TypeError)), got


PAC_TARGETED = [(("pac", "log_stds", 0), "shape"), (("pac", "log_stds", 1), "nan"), (("pac", "prior_log_stds"), "shape"),
                (("pac", "anchors", 0), "dtype"), (("pac", "step"), "negative"), (("pac", "step"), "float"),
                (("pac", "seed"), "huge"), (("pac", "skipped"), "negative"), (("pac", "k_table"), "string"),
                (("pac", "k_table", "values"), "shape"), (("pac", "noise_optimizer", "state", 0, "exp_avg"), "nan"),
                (("pac", "noise_optimizer", "state", 0, "exp_avg_sq"), "negative"), (("base", "state", 1), "delete"),
                (("base", "param_groups", 0, "weight_decay"), "nan")]


@pytest.mark.parametrize("path,how", PAC_TARGETED, ids=[f"{'.'.join(map(str, p))}-{h}" for p, h in PAC_TARGETED])
def test_invalid_pac_states_are_refused_and_change_nothing(path, how):
    from fsam_kernels.optim.pac import KTable
    table = KTable([math.exp(-6), math.exp(-2)], [0.01, 0.2])

    def pac(seed):
        m = model(seed)
        opt = PACTuning(m.named_parameters(), torch.optim.AdamW, num_examples=16, stage1_steps=5, lr=1e-2,
                        k_table=table)
        for s in range(2):
            opt.step(lambda: loss(m, s).backward())
            opt.zero_grad()
        return m, opt

    _, saved = pac(0)
    state = saved.state_dict()
    mutated = apply(state, path, mutate(dict(leaves(state))[path], how, 3, path))
    m, opt = pac(1)
    mine, mine_w = opt.state_dict(), weights(m)
    with pytest.raises((ValueError, TypeError)):
        opt.load_state_dict(mutated)
    assert same(opt.state_dict(), mine) and same(weights(m), mine_w)
    opt.load_state_dict(state)  # and the valid state still loads


# ---- a saved layout changed from outside -------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_layout_changed_from_outside_stops_the_perturbation_and_raises_at_the_next_sync(backend):
    """The optimizers perturb without a host sync: their raw calls carry a status that the device
    sets where a saved layout is bad.  A tampered offset makes the perturbation write nothing (the
    weights stay exact) and the next mask step's sync raises."""
    m, opt = make("FSAM", backend)
    train(m, opt, 1)  # the first mask step; the next is under its mask
    opt.roles.masked_offsets[-1] = 2 ** 62  # past any buffer
    loss(m, 2).backward()
    before = weights(m)
    opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(m)))  # not perturbed
    assert int(opt.roles.status) == 1
    loss(m, 2).backward()
    opt.second_step(zero_grad=True)
    loss(m, 3).backward()
    with pytest.raises(RuntimeError, match="a perturbation was skipped"):
        opt.step(lambda: loss(m, 3))
