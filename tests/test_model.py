"""The model is GPT-2 to the digit: same logits as Hugging Face's GPT2LMHeadModel on the same weights."""
import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.attention import written_out_attention
from modules.checkpoint import model_from_state_dict
from modules.pretrained import convert_gpt2_weights, hf_name_to_gpt2

transformers = pytest.importorskip("transformers")


def small_hf_gpt2(seed=0, context_size=64):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=300, n_positions=context_size, n_embd=48, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    # Random biases and norms too, so that a swapped or untransposed tensor cannot hide.
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    config = {"vocab_size": 300, "context_size": context_size, "embedding_dim": 48, "num_heads": 4,
              "num_layers": 3, "drop_rate": 0.0, "qkv_bias": True}
    return hf_model, config


def ours_from_hf(hf_model, config):
    gpt2_tensors = {hf_name_to_gpt2(name): tensor for name, tensor in hf_model.state_dict().items()}
    return model_from_state_dict(config, convert_gpt2_weights(gpt2_tensors)).eval()


def test_logits_equal_transformers_up_to_full_context():
    hf_model, config = small_hf_gpt2()
    model = ours_from_hf(hf_model, config)
    input_ids = torch.randint(0, 300, (3, config["context_size"]))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        actual = model(input_ids)
    assert actual.shape == (3, config["context_size"], 300)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_greedy_generation_equals_transformers():
    from modules.generation import generate

    hf_model, config = small_hf_gpt2(seed=1)
    model = ours_from_hf(hf_model, config)
    prompt = torch.randint(0, 300, (1, 10))
    expected = hf_model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=True,
                                 attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(generate(model, prompt, 30), expected)


@pytest.mark.parametrize("case", ["causal", "cached", "padded"])
def test_written_out_attention_equals_the_fused_kernel(case):
    torch.manual_seed(0)
    queries_length = 1 if case == "cached" else 9
    queries = torch.randn(2, 3, queries_length, 16)
    keys, values = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    mask = None
    if case == "cached":  # one new token after eight cached ones sees them all
        mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    elif case == "padded":  # causal, and the first two keys of the second sequence are padding
        mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :2] = False
        mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    fused = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                             is_causal=mask is None)
    assert (written_out_attention(queries, keys, values, mask) - fused).abs().max().item() < 1e-5


def test_the_attention_layer_is_the_written_out_formula():
    model = GPTModel({**GPT_CONFIGS["tiny"], "num_layers": 1}).eval()
    attention = model.blocks[0].attention
    x = torch.randn(2, 40, GPT_CONFIGS["tiny"]["embedding_dim"])
    with torch.no_grad():
        fused = attention(x)
        written_out = attention.out_proj(attention.merge_heads(written_out_attention(*attention.split_heads(x))))
    assert (fused - written_out).abs().max().item() < 1e-5


def test_output_head_is_tied_and_classifier_head_is_not():
    model = GPTModel(GPT_CONFIGS["tiny"])
    assert model.out_head.weight is model.token_embedding.weight
    classifier = GPTModel({**GPT_CONFIGS["tiny"], "num_classes": 2})
    assert classifier(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 2)


def test_last_only_scores_the_last_position_as_the_full_forward_does():
    torch.manual_seed(0)
    model = GPTModel(GPT_CONFIGS["tiny"]).eval()
    input_ids = torch.randint(0, GPT_CONFIGS["tiny"]["vocab_size"], (2, 7))
    with torch.no_grad():
        last = model(input_ids, last_only=True)
        torch.testing.assert_close(last, model(input_ids)[:, -1:])
    assert last.shape == (2, 1, GPT_CONFIGS["tiny"]["vocab_size"])


def test_openai_sizes_match_hparams():
    expected = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36), "1558M": (1600, 25, 48)}
    for name, (embedding_dim, heads, layers) in expected.items():
        config = GPT_CONFIGS[name]
        assert (config["embedding_dim"], config["num_heads"], config["num_layers"]) == (embedding_dim, heads, layers)
        assert config["vocab_size"] == 50257 and config["context_size"] == 1024 and config["qkv_bias"] is True


def test_124m_has_124m_parameters():
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIGS["124M"])
    # Tied head counted once, as OpenAI counts it.
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
