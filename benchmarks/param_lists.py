"""Parameter lists to benchmark on: the real models the package is for (shapes from
`transformers` configs built on the meta device: no weights, no downloads) and synthetic
totals cut into layer-sized tensors."""
import torch

LISTS = ("minilm", "bert-base", "roberta-large", "opt-1.3b", "llama-7b")
# Lists benchmarked in a half-precision dtype (their weights and gradients; Fisher values stay fp32).
LIST_DTYPES = {"llama-7b": torch.bfloat16}


def _config(name):
    from transformers import BertConfig, LlamaConfig, OPTConfig, RobertaConfig
    if name == "minilm":  # all-MiniLM-L6-v2 with a classification head
        return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                          num_labels=2)
    if name == "bert-base":
        return BertConfig(num_labels=2)
    if name == "roberta-large":
        return RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    if name == "opt-1.3b":
        return OPTConfig(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                         num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                         num_labels=2)
    if name == "llama-7b":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_labels=2)
    raise ValueError(f"unknown parameter list {name!r}; known: {LISTS}")


def model_shapes(name):
    """[(parameter name, shape)] of the model, in named_parameters() order."""
    from transformers import AutoModelForSequenceClassification
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(_config(name))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def synthetic_shapes(total, tensor_size=768 * 768):
    """`total` parameters as BERT-base-sized weight matrices plus an odd remainder."""
    full, rest = divmod(total, tensor_size)
    shapes = [("w%d" % i, (tensor_size,)) for i in range(full)]
    return shapes + ([("rest", (rest,))] if rest else [])


def shapes_for(spec):
    """A list name (see LISTS) or a size like '4M' / '1000000'."""
    if spec in LISTS:
        return model_shapes(spec)
    return synthetic_shapes(parse_size(spec))


def parse_size(text):
    text = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def dtype_of(spec):
    return LIST_DTYPES.get(spec, torch.float32)


def random_tensors(shapes, device, dtype=torch.float32, seed=0, positive=False):
    """Fresh normal values, drawn on `device` (billions of values are drawn quickly on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _, shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
        out.append((t.abs_() if positive else t).to(dtype))
    return out
