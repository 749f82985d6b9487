"""The speed-ups of modules/linear.py and modules/optim.py compute what the plain versions compute."""
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.generation import generate
from modules.linear import Linear
from modules.optim import make_optimizer

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 32}


def test_inference_kernel_gives_the_plain_logits_and_tokens(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    prompt = torch.randint(0, 50257, (3, 9))
    with torch.no_grad():
        fast = model(prompt)
        fast_tokens = generate(model, prompt, 12)
        monkeypatch.setattr(Linear, "use_onednn", False)  # F.linear everywhere
        plain = model(prompt)
        plain_tokens = generate(model, prompt, 12)
    assert (fast - plain).abs().max().item() < 1e-4
    assert torch.equal(fast_tokens, plain_tokens)


def test_gradients_flow_through_linear_layers():
    model = GPTModel(CONFIG)
    model(torch.randint(0, 50257, (2, 8))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_optimizer_decays_matrices_only_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    model, reference = GPTModel(CONFIG), GPTModel(CONFIG)
    reference.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1, device="cpu")
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert not_decayed["weight_decay"] == 0.0 and all(p.dim() < 2 for p in not_decayed["params"])
    plain = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), foreach=False)
    batch = torch.randint(0, 50257, (2, 8))
    for network, opt in ((model, optimizer), (reference, plain)):
        for _ in range(3):
            network(batch).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
