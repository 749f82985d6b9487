"""modules/inspection.py: the attention maps are those of the model that runs, and the next-token
distribution is the one generation samples from."""
import math

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.generation import pick_next_token, sampling_logits
from modules.inspection import inspect_prompt, prompt_token_ids, sampling_probabilities, token_pieces
from modules.loss import next_token_loss
from modules.tokenizer import END_OF_TEXT_ID, encode

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel({**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 16, "drop_rate": 0.1}).eval()


@pytest.fixture(scope="module")
def inspection(model):
    return inspect_prompt(model, encode("The quick brown fox jumps over the lazy dog"))


def test_the_logits_are_those_of_the_model(model, inspection):
    with torch.no_grad():
        expected = model(torch.tensor([inspection.token_ids]))[0]
    assert torch.equal(inspection.logits, expected)


def test_attention_rows_sum_to_one_and_never_look_ahead(model, inspection):
    tokens = len(inspection.token_ids)
    assert inspection.attention.shape == (2, model.config["num_heads"], tokens, tokens)
    torch.testing.assert_close(inspection.attention.sum(-1), torch.ones(2, model.config["num_heads"], tokens))
    above_diagonal = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    assert (inspection.attention[..., above_diagonal] == 0).all()


def test_the_attention_weights_give_each_block_its_attention_output(model, inspection):
    """Weights x values, merged and projected, equal what each block's fused attention computed."""
    block_inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0])) for block in model.blocks]
    try:
        with torch.no_grad():
            model(torch.tensor([inspection.token_ids]))
            for block, x, weights in zip(model.blocks, block_inputs, inspection.attention):
                attention = block.attention
                _, _, values = attention.split_heads(block.norm1(x))
                written_out = attention.out_proj(attention.merge_heads(weights[None] @ values))
                torch.testing.assert_close(written_out, attention(block.norm1(x)))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(block_inputs) == len(model.blocks)


def test_surprise_is_the_training_loss_of_each_token_in_bits(inspection):
    bits = inspection.surprise_bits()
    assert bits.shape == (len(inspection.token_ids) - 1,) and (bits > 0).all()
    targets = torch.tensor([inspection.token_ids[1:]])
    loss = next_token_loss(inspection.logits[None, :-1], targets)
    torch.testing.assert_close(bits.mean() * math.log(2), loss)
    # Each token's own: -log2 of the probability the model gave it at the position before.
    probabilities = inspection.logits[:-1].softmax(dim=-1)[torch.arange(len(bits)), targets[0]]
    torch.testing.assert_close(bits, -probabilities.log2())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.5),
                                                       (1.0, 50, 0.9)])
def test_the_next_token_distribution_is_the_one_generation_samples_from(inspection, temperature, top_k, top_p):
    logits = inspection.logits[-1] * 20  # a peaked distribution, so that top-p cuts
    probabilities = sampling_probabilities(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probabilities.sum(), torch.tensor(1.0))
    survivors = sampling_logits(logits[None], temperature, top_k, top_p)[0].isfinite()
    assert torch.equal(probabilities > 0, survivors)
    if top_k:
        assert survivors.sum() <= top_k
    # The same seed draws the same token from these probabilities as generation does.
    for seed in range(5):
        drawn = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(seed))
        picked = pick_next_token(logits[None], temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        assert drawn.item() == picked.item()


def test_temperature_zero_puts_everything_on_the_greedy_token(inspection):
    probabilities = sampling_probabilities(inspection.logits[-1], 0.0, top_k=3)
    assert probabilities.sum() == 1 and probabilities[inspection.logits[-1].argmax()] == 1


def test_prompt_token_ids_read_as_generation_does():
    assert prompt_token_ids("", 16) == [END_OF_TEXT_ID]
    long_prompt = "one two three " * 20
    assert prompt_token_ids(long_prompt, 16) == encode(long_prompt)[-16:]


def test_token_pieces_show_split_characters_as_bytes():
    assert token_pieces(encode("Hello world")) == ["Hello", " world"]
    pieces = token_pieces(encode(" 👋"))
    assert len(pieces) > 1 and all(piece.startswith(("\\x", " \\x")) for piece in pieces)
