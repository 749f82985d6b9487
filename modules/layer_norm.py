import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """Normalise each token's vector to zero mean and unit variance, then rescale and shift it.

        y = (x - mean(x)) / sqrt(var(x) + eps) * scale + shift

    The statistics are per token (over the embedding dimension), so a token's scale does not depend on
    the rest of the batch. eps is GPT-2's 1e-5: OpenAI's weights were trained with it. The variance is
    the biased one (divide by n), as in GPT-2. F.layer_norm computes exactly the formula above in one
    fused kernel.
    """

    def __init__(self, embedding_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(embedding_dim))
        self.shift = nn.Parameter(torch.zeros(embedding_dim))

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
