import copy

import pytest
import torch
from torch import nn

from tests.conftest import MICRO_CONFIG
from modules.lora import LoRALinear, apply_lora, has_lora, merge_lora, merged_state_dict
from modules.model import GPTModel
from modules.checkpoint import model_from_state_dict

CONFIG = {**MICRO_CONFIG, "num_layers": 2}


def lora_model(rank=4, alpha=8.0):
    torch.manual_seed(0)
    model = apply_lora(GPTModel(CONFIG), rank, alpha).eval()
    with torch.no_grad():  # B starts at zero; give the adapters something to merge
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.B.normal_(std=0.5)
    return model


def test_apply_lora_wraps_block_linears_freezes_the_rest_and_starts_at_the_base_model():
    torch.manual_seed(0)
    base = GPTModel(CONFIG).eval()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8.0)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert len(wrapped) == 4 * CONFIG["num_layers"]
    assert not isinstance(model.out_head, LoRALinear) and model.out_head.weight is model.token_embedding.weight
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {f"{name}.{p}" for name in wrapped for p in ("A", "B")}
    assert model.blocks[0].attention.qkv_proj.A.shape == (CONFIG["embedding_dim"], 4)
    assert model.blocks[0].attention.qkv_proj.scaling == 2.0  # alpha / rank
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 10))
    torch.testing.assert_close(model(ids), base(ids))  # B = 0: no change until trained


def test_merge_gives_the_same_logits_as_the_adapted_model():
    model = lora_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    adapted = model(ids)
    base_weight = model.blocks[0].feed_forward.expand.linear.weight.clone()
    assert (adapted - model_from_state_dict(CONFIG, merged_state_dict(model))(ids)).abs().max() < 1e-4
    assert has_lora(model)  # merged_state_dict left the model as it was
    torch.testing.assert_close(model.blocks[0].feed_forward.expand.linear.weight, base_weight)

    merged = merge_lora(model)
    assert not has_lora(merged) and type(merged.blocks[0].feed_forward.expand) is nn.Linear
    assert (merged(ids) - adapted).abs().max() < 1e-4
    assert set(merged.state_dict()) == set(GPTModel(CONFIG).state_dict())


def test_only_the_adapters_learn():
    model = lora_model().train()
    frozen = model.blocks[1].attention.out_proj.linear.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 8))
    model(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    torch.testing.assert_close(model.blocks[1].attention.out_proj.linear.weight, frozen)
    assert model.blocks[1].attention.out_proj.A.grad is not None


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)


def test_a_checkpoint_of_a_lora_model_loads_as_a_plain_model(tmp_path):
    from modules.checkpoint import load_checkpoint, save_checkpoint

    model = lora_model()
    save_checkpoint(tmp_path / "lora.pt", model, "lm")
    loaded = load_checkpoint(tmp_path / "lora.pt")
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 9))
    assert not has_lora(loaded) and (loaded(ids) - model(ids)).abs().max() < 1e-4


def test_both_fine_tuning_scripts_read_the_same_lora_flags(monkeypatch):
    import argparse
    import sys

    import fine_tune_classifier
    import fine_tune_instructional

    def lora_flags(parse):
        monkeypatch.setattr(sys, "argv", ["script"])
        captured = {}
        original = argparse.ArgumentParser.parse_args

        def capture(parser, *args, **kwargs):
            captured.update({action.dest: (action.default, action.help) for action in parser._actions
                             if action.dest.startswith("lora_")})
            return original(parser, *args, **kwargs)

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
        parse()
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
        return captured

    classifier = lora_flags(fine_tune_classifier.parse_args)
    assert set(classifier) == {"lora_rank", "lora_alpha"} and classifier["lora_rank"][0] == 0
    assert classifier == lora_flags(fine_tune_instructional.parse_args)


def test_lora_flags_apply_the_rank_and_default_to_a_scale_of_one():
    from modules.errors import UserError
    from modules.lora import lora_from_flags

    plain = GPTModel(CONFIG)
    assert lora_from_flags(plain, 0, None) is None and not has_lora(plain)
    adapted = GPTModel(CONFIG)
    assert lora_from_flags(adapted, 4, None) == {"rank": 4, "alpha": 4.0}
    assert adapted.blocks[0].attention.qkv_proj.scaling == 1.0
    with pytest.raises(UserError, match="--lora-rank must be >= 0"):
        lora_from_flags(GPTModel(CONFIG), -1, None)
    with pytest.raises(UserError, match="--lora-alpha must be > 0"):
        lora_from_flags(GPTModel(CONFIG), 4, 0.0)
