"""GPT-2's parameter names: OpenAI's checkpoint names, Hugging Face's, and ours, and the conversion of
OpenAI-named tensors into our state dict.

OpenAI names a weight "h3/attn/c_attn/w" (without the "model/" its checkpoint puts first); Hugging Face
names the same weight "transformer.h.3.attn.c_attn.weight". Both loaders translate to OpenAI's names
first, so one map to ours serves them both.
"""
import re

# Our parameter name for each of GPT-2's, as OpenAI's checkpoint names them (without "model/").
# GPT-2 implements linear layers as Conv1D with the weight stored (in, out); nn.Linear stores
# (out, in), so every "/w" is transposed. "g" and "b" of a LayerNorm are its scale and shift.
_LAYER_NAMES = {
    "ln_1/g": "norm1.scale", "ln_1/b": "norm1.shift",
    "attn/c_attn/w": "attention.qkv_proj.weight", "attn/c_attn/b": "attention.qkv_proj.bias",
    "attn/c_proj/w": "attention.out_proj.weight", "attn/c_proj/b": "attention.out_proj.bias",
    "ln_2/g": "norm2.scale", "ln_2/b": "norm2.shift",
    "mlp/c_fc/w": "feed_forward.expand.weight", "mlp/c_fc/b": "feed_forward.expand.bias",
    "mlp/c_proj/w": "feed_forward.project.weight", "mlp/c_proj/b": "feed_forward.project.bias",
}
_GLOBAL_NAMES = {
    "wte": "token_embedding.weight", "wpe": "position_embedding.weight",
    "ln_f/g": "final_norm.scale", "ln_f/b": "final_norm.shift",
}


def gpt2_name_to_ours(name):
    """'h3/attn/c_attn/w' -> 'blocks.3.attention.qkv_proj.weight'; None for names GPT-2 has and we do not."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"h(\d+)/(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def hf_name_to_gpt2(name):
    """Hugging Face's 'transformer.h.3.attn.c_attn.weight' -> OpenAI's 'h3/attn/c_attn/w'."""
    name = re.sub(r"^h\.(\d+)\.", r"h\1/", name.removeprefix("transformer.")).replace(".", "/")
    path, _, leaf = name.rpartition("/")
    if path in ("wte", "wpe"):
        return path
    is_norm = path.rsplit("/", 1)[-1].startswith("ln_")
    return f"{path}/{'b' if leaf == 'bias' else 'g' if is_norm else 'w'}"


def gpt2_names(num_layers):
    """OpenAI's name of every weight of a GPT-2 with `num_layers` layers."""
    return list(_GLOBAL_NAMES) + [f"h{layer}/{name}" for layer in range(num_layers) for name in _LAYER_NAMES]


def convert_gpt2_weights(gpt2_tensors):
    """Our state dict from OpenAI-named tensors; weights are transposed as described above.

    gpt2_tensors: a dict {name: tensor}, emptied as it goes, or an iterable of (name, tensor) pairs
    read one at a time from a file; either way at most one weight exists twice at any moment."""
    if isinstance(gpt2_tensors, dict):
        pairs = ((name, gpt2_tensors.pop(name)) for name in list(gpt2_tensors))
    else:
        pairs = gpt2_tensors
    state_dict = {}
    for name, tensor in pairs:
        ours = gpt2_name_to_ours(name)
        if ours is None:
            continue
        if name.endswith("/w"):
            tensor = tensor.reshape(tensor.shape[-2:]).t().contiguous()
        state_dict[ours] = tensor
    state_dict["out_head.weight"] = state_dict["token_embedding.weight"]
    return state_dict
