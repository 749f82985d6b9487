import math
from contextlib import contextmanager

import torch
from torch import nn

from .attention import KVCache
from .config import validate_config
from .layer_norm import LayerNorm
from .transformer import TransformerBlock


@contextmanager
def _skip_initialisation():
    """Make nn.init's functions do nothing while a model whose weights will be replaced is built.

    On the meta device they compute nothing anyway, but normal_ there goes through a Python
    reference implementation that imports torch._dynamo: seconds spent on every checkpoint load."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    originals = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(nn.init, name, function)


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
        self.blocks = nn.ModuleList(TransformerBlock(config, index) for index in range(config["num_layers"]))
        self.final_norm = LayerNorm(embedding_dim)
        if config.get("num_classes"):
            self.out_head = nn.Linear(embedding_dim, config["num_classes"])
        else:
            self.out_head = nn.Linear(embedding_dim, config["vocab_size"], bias=False)
            self.out_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers), so the
        # stream's variance does not grow with depth (two additions per block).
        for name, parameter in self.named_parameters():
            if name.endswith(("out_proj.weight", "project.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config["num_layers"]))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def on_meta_device(cls, config):
        """The model's structure with no weights (parameters on the meta device): shapes at no cost."""
        with torch.device("meta"), _skip_initialisation():
            return cls(config)

    @classmethod
    def from_state_dict(cls, config, state_dict):
        """A model holding `state_dict`, built without first initialising weights only to overwrite them."""
        model = cls.on_meta_device(config)
        model.load_state_dict(state_dict, assign=True)
        if not model.config.get("num_classes"):
            model.out_head.weight = model.token_embedding.weight  # assign=True replaced the tied Parameter
        return model

    def make_kv_cache(self, batch_size, max_tokens=None):
        """An empty cache for generation with this model (see modules/generation.py)."""
        max_tokens = max_tokens or self.config["context_size"]
        weight = self.token_embedding.weight
        return KVCache(self.config, batch_size, max_tokens, weight.device, weight.dtype)

    def forward(self, input_ids, kv_cache=None, attention_mask=None, last_token_only=False):
        """input_ids: (batch, tokens) -> logits (batch, tokens, vocab_size or num_classes).

        kv_cache: a KVCache holding earlier tokens; input_ids are then only the new ones.
        attention_mask: (batch, all tokens) True for real tokens and False for padding, covering the
            cached tokens too; needed only for left-padded batches of prompts of different lengths.
        last_token_only: compute the head for the last position only (all that generation needs).
        """
        batch, tokens = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + tokens > self.config["context_size"]:
            raise ValueError(f"{past + tokens} tokens exceed the context size of {self.config['context_size']}")
        if attention_mask is None:
            positions = torch.arange(past, past + tokens, device=input_ids.device)
        else:
            # With left padding a sequence's first real token is its position 0.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + tokens]
        mask = self._attention_mask(tokens, past, attention_mask, input_ids.device)

        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(tokens)
        if last_token_only:
            x = x[:, -1:]
        return self.out_head(self.final_norm(x))

    @staticmethod
    def _attention_mask(tokens, past, attention_mask, device):
        """None when plain causal attention is right (the fast path), else a boolean mask
        (batch or 1, 1, tokens, past + tokens) that is True where a query may attend to a key."""
        if attention_mask is None and (past == 0 or tokens == 1):
            return None
        query_positions = torch.arange(past, past + tokens, device=device)[:, None]
        key_positions = torch.arange(past + tokens, device=device)[None, :]
        mask = key_positions <= query_positions
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, : past + tokens].bool()
            # A padding query would see no key at all (softmax of nothing is NaN): let it see itself.
            mask = mask | (key_positions == query_positions)
        return mask if mask.dim() == 4 else mask[None, None]
