from torch import nn

from .attention import MultiHeadAttention
from .feed_forward import FeedForward
from .layer_norm import LayerNorm


class TransformerBlock(nn.Module):
    """Attention lets tokens exchange information; the feed-forward network then works on each token.

    Pre-norm, as in GPT-2: each sub-layer sees a normalised input and adds its output to the residual
    stream, so the stream itself is never normalised and gradients reach the first layers unchanged.
    """

    def __init__(self, config):
        super().__init__()
        self.norm1 = LayerNorm(config["embedding_dim"])
        self.attention = MultiHeadAttention(config)
        self.norm2 = LayerNorm(config["embedding_dim"])
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config["drop_rate"])

    def forward(self, x, mask=None, kv_cache=None):
        """x: (batch, tokens, embedding_dim), the same shape out; mask and kv_cache go to the attention."""
        x = x + self.attention(self.norm1(x), mask, kv_cache)
        return x + self.dropout(self.feed_forward(self.norm2(x)))
