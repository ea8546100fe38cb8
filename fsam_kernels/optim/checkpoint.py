"""Checkpoints of a model and its SAM, FSAM or PACTuning optimizer with torch.distributed.checkpoint
(DCP), sharded under FSDP2: each process writes and reads its own shards.

    fsam_kernels.optim.checkpoint.save(path, model, optimizer)
    ...
    fsam_kernels.optim.checkpoint.load(path, model, optimizer)   # an optimizer built as the saved one

What is saved: the model's state (get_model_state_dict), the base optimizer's by parameter name
(get_optimizer_state_dict) and the optimizer's own state, whose tensors with a value per parameter
element (FSAM's mask, one uint8 per element, and Fisher estimates; PAC-tuning's log-stds, anchors
and their Adam moments) are DTensors sharded like their parameters.  Everything in it describes
the whole model, not one process's part: on the same number of processes the run resumes
bit-exactly; on another, DCP reshards every tensor, the optimizer holds the same global state (the
same mask, the same Fisher values) and training goes on as the saved run would have, to the
rounding of the sums over shards.  Works on one process too (plain tensors).
"""
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

__all__ = ["save", "load"]


def _check(optimizer):
    if not hasattr(optimizer, "checkpoint_state"):
        raise TypeError(f"optimizer must be a SAM, FSAM or PACTuning, got {type(optimizer).__name__}")


def save(checkpoint_id, model, optimizer):
    """Save `model` and `optimizer` (between steps) to `checkpoint_id` (a directory); every process
    of the run calls it."""
    _check(optimizer)
    own = optimizer.checkpoint_state()
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": {"base": get_optimizer_state_dict(model, optimizer.base_optimizer), "own": own}},
             checkpoint_id=checkpoint_id)


def load(checkpoint_id, model, optimizer):
    """Load what save() wrote into `model` and `optimizer` (built with the same options and
    parameters as the saved one; between steps); every process of the run calls it.  The
    optimizer's checks come before anything is loaded."""
    _check(optimizer)
    header = {"optimizer": {"own": {"type": None, "step": None}}}
    dcp.load(header, checkpoint_id=checkpoint_id)
    saved = header["optimizer"]["own"]
    if saved["type"] != type(optimizer).__name__:
        raise ValueError(f"this checkpoint holds a {saved['type']}, not a {type(optimizer).__name__}")
    # get_optimizer_state_dict gives the base optimizer a zero state first when it has none: its template
    state = {"model": get_model_state_dict(model),
             "optimizer": {"base": get_optimizer_state_dict(model, optimizer.base_optimizer),
                           "own": optimizer.checkpoint_template(saved["step"])}}
    dcp.load(state, checkpoint_id=checkpoint_id)

    def load_base():
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer.base_optimizer, state["optimizer"]["base"])
    optimizer.load_checkpoint_state(state["optimizer"]["own"], load_base)
