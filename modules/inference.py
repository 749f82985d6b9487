"""What generation adds to the model: a cache of keys and values, and positions and masks for batches
of prompts of different lengths. The model's files know nothing of it beyond three arguments of forward.

Each new token attends to the keys and values of every token before it. Recomputing those at every step
would run the whole sequence through the model again; the KV cache keeps them, so a step runs the model
on the new token alone (LLMs-from-scratch keeps its KV cache apart from the model in the same way).

Prompts of different lengths share a batch by padding the shorter ones on the left, so that every
sequence's next token lands in the same column. `attention_mask` (batch, tokens), False on padding,
keeps the padding out: a sequence's first real token has position 0, and no token attends to padding.

This is the eager path, the one a learner reads and edits: a change to attention shows at the next call
of generate, with nothing to compile. The fast path (modules/speed/compiled_generation.py) keeps its own
cache of fixed shape beside it and reuses token_positions and attention_mask_for.
"""
import torch


class KVCache:
    """The keys and values of every layer, allocated once for `max_tokens` positions and filled in place:
    generation never re-allocates or concatenates them."""

    def __init__(self, config, batch_size, max_tokens, device, dtype):
        head_dim = config["embedding_dim"] // config["num_heads"]
        shape = (batch_size, config["num_heads"], max_tokens, head_dim)
        self.layers = [LayerKVCache(shape, device, dtype) for _ in range(config["num_layers"])]

    @classmethod
    def for_model(cls, model, batch_size, max_tokens=None):
        """An empty cache for `model`, on its device and in its dtype, for up to its context size."""
        return cls(model.config, batch_size, max_tokens or model.config["context_size"],
                   *activation_device_and_dtype(model))

    @property
    def length(self):
        """How many positions are filled (the same in every layer once a forward pass is done)."""
        return self.layers[0].length

    def clear(self):
        for layer in self.layers:
            layer.length = 0


class LayerKVCache:
    """One layer's keys and values, (batch, heads, max_tokens, head_dim) each."""

    def __init__(self, shape, device, dtype):
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, keys, values):
        """Store the new positions' keys and values; return those of every position so far."""
        end = self.length + keys.shape[2]
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class EagerDecoding:
    """How one generation gets each next token's logits on the eager path: next_token_logits over a growing
    KVCache (use_cache False: the whole window through the model at every step, the reference the cache
    is tested against). The fast path's decoder (modules/speed/compiled_generation.py) starts objects with
    the same two methods."""

    def __init__(self, model, batch_size, use_cache=True):
        self.model = model
        self.kv_cache = KVCache.for_model(model, batch_size) if use_cache else None

    def next_token_logits(self, tokens, attention_mask=None):
        return next_token_logits(self.model, tokens, attention_mask, self.kv_cache)

    def clear(self):
        """Forget every cached position: the window slid, so every token's position changed."""
        if self.kv_cache is not None:
            self.kv_cache.clear()


def activation_device_and_dtype(model):
    """Where and in which dtype the model computes: that of its token embedding."""
    weight = model.token_embedding.weight
    return weight.device, weight.dtype


def next_token_logits(model, tokens, attention_mask=None, kv_cache=None):
    """(batch, vocab) logits of the token that follows `tokens` (batch, tokens so far, at most the context).

    With a cache, only the tokens it does not hold yet go through the model (all of them the first time).
    attention_mask: (batch, tokens), False on left padding; None when no sequence is padded.
    """
    past = kv_cache.length if kv_cache is not None else 0
    new_tokens = tokens[:, past:]
    positions = token_positions(attention_mask, past, new_tokens.shape[1], tokens.device)
    mask = attention_mask_for(attention_mask, past, new_tokens.shape[1], tokens.device)
    return model(new_tokens, positions, mask, kv_cache, last_only=True)[:, -1]


def token_positions(attention_mask, past, new_tokens, device):
    """Positions of the new tokens, (1, new_tokens), or (batch, new_tokens) under left padding, where a
    sequence's first real token is its position 0, as it would be without padding."""
    if attention_mask is None:
        return torch.arange(past, past + new_tokens, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + new_tokens]


def attention_mask_for(attention_mask, past, new_tokens, device):
    """The mask MultiHeadAttention takes: None where plain causal attention is right (no padding, nothing
    cached), else (batch or 1, 1, new_tokens, keys), True where a query may attend to a key. The keys are
    the past and new tokens, or as many as `attention_mask` (batch, keys) has columns (the compiled path's
    fixed slots, the later ones not written yet)."""
    if attention_mask is None and past == 0:
        return None
    keys = past + new_tokens if attention_mask is None else attention_mask.shape[1]
    query_positions = torch.arange(past, past + new_tokens, device=device)[:, None]
    key_positions = torch.arange(keys, device=device)[None, :]
    mask = (key_positions <= query_positions)[None, None]  # causal, queries after the cached tokens
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
        # A padding query would see no key at all (softmax of nothing is NaN): let it see itself.
        mask = mask | (key_positions == query_positions)
    return mask
