import math

import torch
from torch import nn
from torch.nn import functional as F

from .linear import Linear


class KVCache:
    """The keys and values every layer has computed so far, so a new token costs one position.

    Buffers are allocated once for `max_tokens` positions and filled in place; generation never
    re-allocates or concatenates them.
    """

    def __init__(self, config, batch_size, max_tokens, device, dtype):
        head_dim = config["embedding_dim"] // config["num_heads"]
        shape = (config["num_layers"], batch_size, config["num_heads"], max_tokens, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions already filled, the same for every layer

    @property
    def capacity(self):
        return self.keys.shape[3]

    def update(self, layer_index, keys, values):
        """Store the new positions of one layer and return all of that layer's keys and values."""
        end = self.length + keys.shape[2]
        self.keys[layer_index, :, :, self.length:end] = keys
        self.values[layer_index, :, :, self.length:end] = values
        return self.keys[layer_index, :, :, :end], self.values[layer_index, :, :, :end]

    def advance(self, num_tokens):
        """Called by the model once every layer has stored the new positions."""
        self.length += num_tokens


def readable_attention(queries, keys, values, mask=None, dropout=0.0):
    """Scaled dot-product attention written out; `mask` is True where a query may look at a key.

    queries: (batch, heads, query_tokens, head_dim); keys and values: (batch, heads, key_tokens, head_dim).
    With no mask the attention is causal: query i sees keys 0..i.
    """
    # How well each query matches each key. Dividing by sqrt(head_dim) keeps the scores' variance
    # near 1 whatever the head size, so softmax does not saturate into a one-hot.
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(queries.shape[-1])
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    # A token must not see the future: masked scores become -inf, i.e. weight 0 after softmax.
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, dropout)
    # Each query's output is the weighted average of the values it attends to.
    return weights @ values


class MultiHeadAttention(nn.Module):
    """Causal self-attention with `num_heads` heads, computed for all heads at once.

    One Linear produces queries, keys and values together (one matrix multiply instead of three);
    the heads are a reshape, not a Python loop.
    """

    # The fused kernel is exact up to float rounding; set to False to run readable_attention instead.
    use_fast_kernel = True

    def __init__(self, config, layer_index):
        super().__init__()
        self.num_heads = config["num_heads"]
        self.head_dim = config["embedding_dim"] // config["num_heads"]
        self.layer_index = layer_index  # where this layer's entries live in a KVCache
        self.drop_rate = config["drop_rate"]
        self.qkv_proj = Linear(config["embedding_dim"], 3 * config["embedding_dim"], bias=config["qkv_bias"])
        self.out_proj = Linear(config["embedding_dim"], config["embedding_dim"])
        self.resid_dropout = nn.Dropout(config["drop_rate"])

    def forward(self, x, kv_cache=None, mask=None):
        """x: (batch, tokens, embedding_dim). `mask` (batch or 1, 1, tokens, all tokens) is given by the
        model when plain causality is not enough: padding, or new tokens after cached ones."""
        batch, tokens, embedding_dim = x.shape
        # (batch, tokens, 3 * embedding) -> 3 x (batch, heads, tokens, head_dim)
        queries, keys, values = (
            self.qkv_proj(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        if kv_cache is not None:
            keys, values = kv_cache.update(self.layer_index, keys, values)
        dropout = self.drop_rate if self.training else 0.0
        if self.use_fast_kernel:
            # A single new token attends to every cached key, so it needs no mask at all.
            is_causal = mask is None and tokens > 1
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
        else:
            if mask is None and tokens == 1:
                mask = torch.ones(1, keys.shape[2], dtype=torch.bool, device=x.device)
            context = readable_attention(queries, keys, values, mask, dropout)
        # Put the heads side by side again: (batch, tokens, embedding_dim)
        context = context.transpose(1, 2).reshape(batch, tokens, embedding_dim)
        return self.resid_dropout(self.out_proj(context))
