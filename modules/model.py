import math

import torch
from torch import nn

from .config import validate_config
from .layer_norm import LayerNorm
from .transformer import TransformerBlock


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, a stack of transformer blocks, a final LayerNorm, a head.

    The language-model head shares its matrix with the token embedding (weight tying, as in GPT-2):
    the same vectors that encode a token score how likely it is next. With `num_classes` in the config
    the head is instead a small Linear that scores classes (the spam classifier).
    """

    def __init__(self, config):
        super().__init__()
        self.config = dict(validate_config(config))
        embedding_dim = config["embedding_dim"]
        self.token_embedding = nn.Embedding(config["vocab_size"], embedding_dim)
        self.position_embedding = nn.Embedding(config["context_size"], embedding_dim)
        self.dropout = nn.Dropout(config["drop_rate"])
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config["num_layers"]))
        self.final_norm = LayerNorm(embedding_dim)
        if config.get("num_classes"):
            self.out_head = nn.Linear(embedding_dim, config["num_classes"])
        else:
            self.out_head = nn.Linear(embedding_dim, config["vocab_size"], bias=False)
            self.tie_weights()
        self.apply(init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers), so the
        # stream's variance does not grow with depth (two additions per block).
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "project.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config["num_layers"]))

    def tie_weights(self):
        """Make the language-model head use the token embedding's matrix (again, after loading weights)."""
        self.out_head.weight = self.token_embedding.weight

    def forward(self, input_ids, positions=None, mask=None, kv_cache=None, last_only=False):
        """input_ids: (batch, tokens) -> logits (batch, tokens, vocab_size or num_classes).

        Training passes input_ids alone. Generation (modules/inference.py) runs the new tokens only and
        passes their positions (batch or 1, tokens), the mask of the keys they may attend to and the
        KV cache that holds the earlier tokens; it needs the next token's logits only (last_only: then
        (batch, 1, vocab_size)), so the head, the largest matrix, scores the last position alone (as nanoGPT).
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # What each token is, plus where it is: (batch, tokens, embedding_dim).
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        layer_caches = kv_cache.layers if kv_cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches):
            x = block(x, mask, layer_cache)
        if last_only:
            x = x[:, -1:]
        return self.out_head(self.final_norm(x))


def init_weights(module):
    """GPT-2's initialisation: normal(0, 0.02) for matrices and embeddings, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
