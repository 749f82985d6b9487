"""The model is GPT-2 to the digit: same logits as Hugging Face's GPT2LMHeadModel on the same weights."""
import pytest
import torch

from get_gpt_weights import convert_gpt2_weights, hf_name_to_gpt2
from modules import GPTModel, GPT_CONFIGS
from modules.attention import MultiHeadAttention

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
    return GPTModel.from_state_dict(config, convert_gpt2_weights(gpt2_tensors)).eval()


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


def test_readable_attention_equals_fast_kernel():
    model = GPTModel({**GPT_CONFIGS["tiny"], "num_layers": 2}).eval()
    input_ids = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        fast = model(input_ids)
        MultiHeadAttention.use_fast_kernel = False
        try:
            readable = model(input_ids)
        finally:
            MultiHeadAttention.use_fast_kernel = True
    assert (fast - readable).abs().max().item() < 1e-4


def test_output_head_is_tied_and_classifier_head_is_not():
    model = GPTModel(GPT_CONFIGS["tiny"])
    assert model.out_head.weight is model.token_embedding.weight
    classifier = GPTModel({**GPT_CONFIGS["tiny"], "num_classes": 2})
    assert classifier(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 2)


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
