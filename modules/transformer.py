from torch import nn

from .attention import MultiHeadAttention
from .feed_forward import FeedForward
from .layer_norm import LayerNorm


class TransformerBlock(nn.Module):
    """Attention lets tokens exchange information; the feed-forward network then processes each token.

    Pre-norm, as in GPT-2: each sub-layer sees a normalised input and adds its output to the residual
    stream, so the stream itself is never normalised and gradients reach the first layers unchanged.
    """

    def __init__(self, config, layer_index):
        super().__init__()
        self.norm1 = LayerNorm(config["embedding_dim"])
        self.attention = MultiHeadAttention(config, layer_index)
        self.norm2 = LayerNorm(config["embedding_dim"])
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config["drop_rate"])

    def forward(self, x, kv_cache=None, mask=None):
        x = x + self.attention(self.norm1(x), kv_cache, mask)
        return x + self.dropout(self.feed_forward(self.norm2(x)))
