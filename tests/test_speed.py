"""The speed machinery (modules/speed/, modules/training/optimizer.py) computes what the plain versions compute."""
import copy
import time

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.generation import generate
from modules.training.optimizer import make_optimizer
from modules.speed import empty_model, model_from_state_dict, use_fastest_linear_kernels
from modules.speed import kernels

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 32}


@pytest.mark.parametrize("winner", ["onednn", "pytorch"])
def test_measured_kernels_give_the_plain_logits_and_tokens(monkeypatch, winner):
    if not kernels.ONEDNN_AVAILABLE:
        pytest.skip("this PyTorch build has no oneDNN")
    # Whichever kernel the measurement picks, the model computes the same: force each in turn.
    chosen = kernels.onednn_linear if winner == "onednn" else torch.nn.functional.linear
    monkeypatch.setattr(kernels, "_measure", lambda x, weight, bias, candidates: chosen)
    monkeypatch.setattr(kernels, "_fastest", {})
    torch.manual_seed(0)
    plain = GPTModel(CONFIG).eval()
    fast = use_fastest_linear_kernels(copy.deepcopy(plain))
    assert type(fast.blocks[0].attention.qkv_proj) is kernels.MeasuredLinear
    assert fast.out_head.weight is fast.token_embedding.weight  # still tied
    prompt = torch.randint(0, 50257, (3, 9))
    with torch.no_grad():
        assert (fast(prompt) - plain(prompt)).abs().max().item() < 1e-4
    assert set(kernels._fastest.values()) == {chosen}
    assert torch.equal(generate(fast, prompt, 12), generate(plain, prompt, 12))


def test_the_measurement_picks_the_faster_kernel():
    def slow(x, weight, bias):
        time.sleep(0.002)
        return torch.nn.functional.linear(x, weight, bias)

    fast = torch.nn.functional.linear
    x, weight = torch.randn(1, 64), torch.randn(64, 64)
    assert kernels._measure(x, weight, None, (fast, slow)) is fast
    assert kernels._measure(x, weight, None, (slow, fast)) is fast


def test_a_product_too_long_to_measure_keeps_the_default(monkeypatch):
    monkeypatch.setattr(kernels, "MAX_MEASURED_SECONDS", 0.0)
    default, other = (lambda x, weight, bias: x), (lambda x, weight, bias: 1 / 0)
    assert kernels._measure(torch.randn(1, 4), torch.randn(4, 4), None, (default, other)) is default


def test_training_never_takes_the_inference_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_measure", lambda x, weight, bias, candidates: kernels.onednn_linear)
    model = use_fastest_linear_kernels(GPTModel(CONFIG))
    model(torch.randint(0, 50257, (2, 8))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_built_around_weights_draws_no_random_numbers():
    weights = GPTModel(CONFIG).state_dict()
    torch.manual_seed(0)
    model = model_from_state_dict(CONFIG, weights)
    drawn_after_building = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn_after_building, torch.rand(3))  # building drew no random number
    assert model.out_head.weight is model.token_embedding.weight
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    assert all(p.is_meta for p in empty_model(CONFIG).parameters())


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
