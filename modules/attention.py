"""Causal multi-head self-attention: how each token gathers information from the tokens before it.

From each token's vector, three are computed: a query (what it looks for), a key (what it offers to be
found by) and a value (what it passes on). A token's output is the average of the values of the tokens
it may see, weighted by how well its query matches their keys:

    attention(Q, K, V) = softmax(Q K^T / sqrt(head_dim), over the keys a query may see) V

GPT-2 runs `num_heads` such attentions side by side, each on its own head_dim = embedding_dim / num_heads
dimensions, so that different heads can follow different patterns (the previous word, the subject of
the sentence, the matching bracket...).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadAttention(nn.Module):
    """Causal self-attention with `num_heads` heads, all computed at once: the heads are a reshape of
    one big projection, not a Python loop."""

    def __init__(self, config):
        super().__init__()
        embedding_dim = config["embedding_dim"]
        self.num_heads = config["num_heads"]
        self.head_dim = embedding_dim // self.num_heads
        # One Linear makes the queries, keys and values of every head: one matrix multiply instead of three.
        self.qkv_proj = nn.Linear(embedding_dim, 3 * embedding_dim, bias=config["qkv_bias"])
        # Mixes what the heads found back into one vector per token.
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self.attention_drop_rate = config["drop_rate"]
        self.resid_dropout = nn.Dropout(config["drop_rate"])

    def forward(self, x, mask=None, kv_cache=None):
        """x: (batch, tokens, embedding_dim) -> (batch, tokens, embedding_dim).

        mask: None for plain causal attention (training); otherwise True where a query may attend to a key,
            shaped (batch or 1, 1, tokens, keys). Generation passes one (modules/inference.py) when its
            queries are not the same tokens as its keys (cached tokens) or when prompts are padded.
        kv_cache: one layer's cache during generation; the keys and values of earlier tokens come from it.
        """
        queries, keys, values = self.split_heads(x)
        if kv_cache is not None:
            keys, values = kv_cache.update(keys, values)
        drop_rate = self.attention_drop_rate if self.training else 0.0
        # PyTorch's fused kernel computes written_out_attention() below without materialising the
        # (tokens x keys) weights; tests/test_model.py checks that the two agree.
        context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=drop_rate,
                                                 is_causal=mask is None)
        return self.resid_dropout(self.out_proj(self.merge_heads(context)))

    def split_heads(self, x):
        """(batch, tokens, embedding_dim) -> queries, keys, values, each (batch, heads, tokens, head_dim)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # 3 x (batch, heads, tokens, head_dim)
        return queries, keys, values

    def merge_heads(self, context):
        """(batch, heads, tokens, head_dim) -> (batch, tokens, embedding_dim): the heads side by side again."""
        batch, _, tokens, _ = context.shape
        return context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)


def attention_weights(queries, keys, mask=None):
    """How much each query attends to each key: (batch, heads, queries, keys), every row summing to 1.

    mask: True where a query may look at a key; None is causal (query i sees keys 0..i).
    """
    # How well each query matches each key. Dividing by sqrt(head_dim) keeps the scores' variance near 1
    # whatever the head size, so that softmax does not saturate into a one-hot.
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(queries.shape[-1])
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    # A token must not see the future: a masked score becomes -inf, which softmax turns into a weight of 0.
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def written_out_attention(queries, keys, values, mask=None, drop_rate=0.0):
    """softmax(Q K^T / sqrt(head_dim)) V step by step: what F.scaled_dot_product_attention computes.

    Shapes as in MultiHeadAttention.split_heads; dropout, while training, drops whole attention links."""
    weights = F.dropout(attention_weights(queries, keys, mask), drop_rate)
    # Each query's output is the weighted average of the values it attends to.
    return weights @ values
