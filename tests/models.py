"""A tiny random-weight BERT and deterministic batches for optimizer tests."""
import torch


def tiny_bert(seed=0, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).to(dtype)


def batch(step, size=8, length=12):
    g = torch.Generator().manual_seed(1000 + step)
    return {"input_ids": torch.randint(0, 97, (size, length), generator=g),
            "labels": torch.randint(0, 3, (size,), generator=g)}


def loss_of(model, step):
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch(step).items()}).loss.float()


def train(model, opt, steps, start=0, loss=None):
    """`steps` two-pass steps on batches start, start + 1, ... (loss(model, step): loss_of's by default)."""
    loss = loss or loss_of
    for s in range(start, start + steps):
        loss(model, s).backward()
        opt.first_step(zero_grad=True)
        loss(model, s).backward()
        opt.second_step(zero_grad=True)


def overflow_backward(model, at_call):
    """Make the `at_call`-th backward through `model` (counting from 0) overflow, via a gradient
    hook on the classifier weight."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] - 1 == at_call else grad
    model.classifier.weight.register_hook(hook)


def snapshot(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def assert_bits_equal(a, b):
    for n in a:
        assert torch.equal(a[n].view(torch.uint8) if a[n].dim() else a[n], b[n].view(torch.uint8) if b[n].dim() else b[n]), n
