"""Parameter lists as users pass them (tensors, param-group dicts, `named_parameters()`)."""
import torch


def _split_named(items, where):
    tensors, names = [], []
    for item in items:
        if isinstance(item, torch.Tensor):
            tensors.append(item)
            names.append(None)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            if not isinstance(item[0], str):
                raise TypeError(f"{where}: a (name, parameter) pair needs a str name, got {type(item[0]).__name__}")
            names.append(item[0])
            tensors.append(item[1])
        else:
            raise TypeError(f"{where}: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
    return tensors, names


def param_groups_with_names(params):
    """(param groups holding plain tensors, the name of every parameter in flat order or None)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, param groups or (name, tensor) pairs, "
                        "got a single tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters")
    if all(isinstance(g, dict) for g in items):
        groups, names = [], []
        for i, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"param group {i} has no 'params' entry")
            group_params = g["params"]
            if isinstance(group_params, torch.Tensor):
                group_params = [group_params]
            tensors, group_names = _split_named(group_params, f"param group {i}")
            groups.append({**g, "params": tensors})
            names.extend(group_names)
        return groups, names
    if any(isinstance(g, dict) for g in items):
        raise TypeError("params mixes param-group dicts with tensors")
    tensors, names = _split_named(items, "params")
    return [{"params": tensors}], names
