"""Pairing with the reference: transformers' GPT2LMHeadModel and our GPTModel holding the same weights."""
import torch


def hf_config(config):
    """A transformers GPT2Config of the same shape as our config dict."""
    import transformers

    drop = config["drop_rate"]
    return transformers.GPT2Config(
        vocab_size=config["vocab_size"], n_positions=config["context_size"], n_embd=config["embedding_dim"],
        n_layer=config["num_layers"], n_head=config["num_heads"], resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
        bos_token_id=config["vocab_size"] - 1, eos_token_id=config["vocab_size"] - 1,  # <|endoftext|> in GPT-2
    )


def reference_model(config, seed, device):
    """transformers' GPT2LMHeadModel with random weights drawn from `seed`."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_config(config)).to(device)


def ours_from_reference(hf_model, config):
    """Our GPTModel holding exactly the reference's weights (copies, so neither side shares memory)."""
    from modules.checkpoint import model_from_state_dict
    from modules.pretrained import convert_gpt2_weights, hf_name_to_gpt2

    tensors = {hf_name_to_gpt2(name): tensor.detach().clone() for name, tensor in hf_model.state_dict().items()}
    return model_from_state_dict(config, convert_gpt2_weights(tensors))


def model_pair(config, seed, device):
    """(ours, reference) with the same random weights."""
    reference = reference_model(config, seed, device)
    return ours_from_reference(reference, config), reference


def one_side_model(side, config, seed, device):
    """The model of one side alone ("ours" or "reference"), for a fresh process that measures its memory:
    ours is built directly, not converted from a reference that would stay in memory."""
    if side == "reference":
        return reference_model(config, seed, device)
    from modules import GPTModel

    torch.manual_seed(seed)
    return GPTModel(config).to(device)
