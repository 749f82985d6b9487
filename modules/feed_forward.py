from torch import nn
from torch.nn import functional as F


class FeedForward(nn.Module):
    """Per-token MLP: widen to 4x the embedding, GELU, project back. Tokens do not mix here; attention
    moved information between them, and this is where each token's vector is worked on."""

    def __init__(self, config):
        super().__init__()
        hidden_dim = 4 * config["embedding_dim"]
        self.expand = nn.Linear(config["embedding_dim"], hidden_dim)
        self.activation = GELU()
        self.project = nn.Linear(hidden_dim, config["embedding_dim"])

    def forward(self, x):
        """(batch, tokens, embedding_dim) -> (batch, tokens, 4 * embedding_dim) -> (batch, tokens, embedding_dim)."""
        return self.project(self.activation(self.expand(x)))


class GELU(nn.Module):
    """GPT-2's GELU, the tanh approximation:

        GELU(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))

    Smooth where ReLU has a kink, and slightly negative for small negative inputs, so gradients still
    flow there. F.gelu(approximate="tanh") evaluates this formula in one kernel.
    """

    def forward(self, x):
        return F.gelu(x, approximate="tanh")
