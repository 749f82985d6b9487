"""The speed-ups of modules/linear.py and modules/optim.py compute what the plain versions compute."""
import copy

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.generation import generate
from modules.linear import Linear
from modules.optim import make_optimizer

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 32}


def test_inference_kernel_gives_the_plain_logits_and_tokens(monkeypatch):
    if not Linear.use_onednn:
        pytest.skip("this PyTorch build has no oneDNN")
    # The tiny model's matrices are below the size where oneDNN pays off: use it for all of them.
    monkeypatch.setattr(Linear, "onednn_min_weight_elements", 0)
    monkeypatch.setattr(Linear, "onednn_max_rows", 10_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    prompt = torch.randint(0, 50257, (3, 9))
    try:
        with torch.no_grad():
            assert model.out_head._onednn_is_faster(torch.zeros(1, CONFIG["embedding_dim"]))
            fast = model(prompt)
            fast_tokens = generate(model, prompt, 12)
            monkeypatch.setattr(Linear, "use_onednn", False)  # F.linear everywhere
            plain = model(prompt)
            plain_tokens = generate(model, prompt, 12)
    finally:
        torch.set_num_threads(threads)
    assert (fast - plain).abs().max().item() < 1e-4
    assert torch.equal(fast_tokens, plain_tokens)


def test_training_never_takes_the_inference_kernel(monkeypatch):
    monkeypatch.setattr(Linear, "onednn_min_weight_elements", 0)
    monkeypatch.setattr(Linear, "onednn_max_rows", 10_000)
    model = GPTModel(CONFIG)
    model(torch.randint(0, 50257, (2, 8))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_optimizer_decays_matrices_only():
    optimizer = make_optimizer(GPTModel(CONFIG), lr=1e-3, weight_decay=0.1, device="cpu")
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert not_decayed["weight_decay"] == 0.0 and all(p.dim() < 2 for p in not_decayed["params"])
    assert len(decayed["params"]) == 1 + 1 + 4 * CONFIG["num_layers"]  # embeddings, 4 matrices a block


def test_optimizer_steps_like_plain_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1, device="cpu")
    plain = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), foreach=False)
    inputs = torch.randn(32, 8)
    for network, opt in ((model, optimizer), (reference, plain)):
        for _ in range(5):
            network(inputs).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
