"""What generation adds to the model: a cache of keys and values, and positions and masks for batches
of prompts of different lengths. The model's files know nothing of it beyond three arguments of forward.

Each new token attends to the keys and values of every token before it. Recomputing those at every step
would run the whole sequence through the model again; the KV cache keeps them, so a step runs the model
on the new token alone (LLMs-from-scratch keeps its KV cache apart from the model in the same way).

Prompts of different lengths share a batch by padding the shorter ones on the left, so that every
sequence's next token lands in the same column. `attention_mask` (batch, tokens), False on padding,
keeps the padding out: a sequence's first real token has position 0, and no token attends to padding.

KVCache grows by one position a step, so every step attends over a longer slice: a shape a compiler would
see anew each time. StaticKVCache keeps fixed buffers instead, for the compiled decoding step
(modules/speed/compiled_generation.py, after gpt-fast): a step writes its keys and values into one slot and
attends over every slot, a boolean mask keeping out the slots not written yet and the padding. Attending
over empty slots costs time, so the number of slots comes in a few sizes (SLOT_BUCKETS): a short chat gets
a short cache, not one as long as the context.
"""
import torch

SLOT_BUCKETS = (128, 256, 384, 512, 768, 1024)


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


class StaticKVCache:
    """Every layer's keys and values in a fixed number of slots, and which slots hold a real token.

    Slot i holds column i of the left-padded batch. The model's layers call update(keys, values) as with
    KVCache; the slots that the new tokens go to are set before the forward pass (`write_slots`)."""

    def __init__(self, config, batch_size, slots, device, dtype):
        head_dim = config["embedding_dim"] // config["num_heads"]
        shape = (batch_size, config["num_heads"], slots, head_dim)
        self.layers = [StaticLayerKVCache(self, shape, device, dtype) for _ in range(config["num_layers"])]
        self.filled = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)  # False: padding or empty
        self.slot_ids = torch.arange(slots, device=device)
        self.write_slots = self.slot_ids[:0]
        self.length = 0  # slots written so far

    @classmethod
    def for_model(cls, model, batch_size, tokens):
        """An empty cache for `model`, on its device and in its activations' dtype, for `tokens` positions
        (rounded up to a bucket, at most the context)."""
        slots = cache_slots(tokens, model.config["context_size"])
        return cls(model.config, batch_size, slots, *activation_device_and_dtype(model))

    def clear(self):
        self.filled.fill_(False)
        self.length = 0

    def prefill_inputs(self, attention_mask, tokens):
        """(positions, mask) of a prompt of `tokens` columns written into slots 0..tokens-1."""
        self.filled[:, :tokens] = True if attention_mask is None else attention_mask
        self.write_slots = self.slot_ids[:tokens]
        device = self.filled.device
        return (token_positions(self.filled[:, :tokens], 0, tokens, device),
                attention_mask_for(self.filled, 0, tokens, device))

    def step_inputs(self, slot):
        """(positions, mask) of one new real token per sequence written into `slot`, a (1,) tensor."""
        self.filled.index_fill_(1, slot, True)
        self.write_slots = slot
        positions = self.filled.sum(-1, keepdim=True) - 1  # (batch, 1): how many real tokens came before
        mask = (self.slot_ids <= slot) & self.filled  # (batch, slots)
        return positions, mask[:, None, None, :]


class StaticLayerKVCache:
    """One layer's keys and values, (batch, heads, slots, head_dim) each, zeros until written: a masked
    slot's weight is exactly 0, and 0 times an uninitialised NaN would still be NaN."""

    def __init__(self, cache, shape, device, dtype):
        self.cache = cache
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, keys, values):
        """Write the new tokens' keys and values into their slots; return every slot's."""
        self.keys.index_copy_(2, self.cache.write_slots, keys)
        self.values.index_copy_(2, self.cache.write_slots, values)
        return self.keys, self.values


def cache_slots(tokens, context_size):
    """The slots of a StaticKVCache for `tokens` positions: the smallest bucket that holds them, at most
    the context (past it, the window slides and is recomputed)."""
    return min([bucket for bucket in SLOT_BUCKETS if bucket >= tokens] + [context_size])


def activation_device_and_dtype(model):
    """Where and in which dtype the model computes: that of its token embedding."""
    weight = model.token_embedding.weight
    return weight.device, weight.dtype


def decode_step(model, kv_cache, token, slot):
    """(batch, vocab) logits after one new token per sequence, (batch, 1), written into `slot` of a
    StaticKVCache: the same shapes at every step, the function modules/speed/compiled_generation.py compiles."""
    positions, mask = kv_cache.step_inputs(slot)
    return model(token, positions, mask, kv_cache)[:, -1]


def next_token_logits(model, tokens, attention_mask=None, kv_cache=None, step=decode_step):
    """(batch, vocab) logits of the token that follows `tokens` (batch, tokens so far, at most the context).

    With a cache, only the tokens it does not hold yet go through the model (all of them the first time);
    with a StaticKVCache, a later token goes through `step` (decode_step or its compiled form).
    attention_mask: (batch, tokens), False on left padding; None when no sequence is padded.
    """
    if isinstance(kv_cache, StaticKVCache):
        return static_next_token_logits(model, tokens, attention_mask, kv_cache, step)
    past = kv_cache.length if kv_cache is not None else 0
    new_tokens = tokens[:, past:]
    positions = token_positions(attention_mask, past, new_tokens.shape[1], tokens.device)
    mask = attention_mask_for(attention_mask, past, new_tokens.shape[1], tokens.device)
    return model(new_tokens, positions, mask, kv_cache, last_only=True)[:, -1]


def static_next_token_logits(model, tokens, attention_mask, kv_cache, step):
    """next_token_logits with a StaticKVCache: the prompt at once (the first call), then one token a step."""
    past = kv_cache.length
    if past == 0:
        positions, mask = kv_cache.prefill_inputs(attention_mask, tokens.shape[1])
        logits = model(tokens, positions, mask, kv_cache, last_only=True)[:, -1]
    else:
        if tokens.shape[1] != past + 1:
            raise ValueError("a StaticKVCache takes one new token a step")
        slot = torch.full((1,), past, device=tokens.device)
        # A copy with the strides of a fresh (batch, 1) tensor: a compiled step is specialised on strides.
        logits = step(model, kv_cache, tokens[:, -1:].clone(memory_format=torch.contiguous_format), slot)
    kv_cache.length = tokens.shape[1]
    return logits


def token_positions(attention_mask, past, new_tokens, device):
    """Positions of the new tokens, (1, new_tokens), or (batch, new_tokens) under left padding, where a
    sequence's first real token is its position 0, as it would be without padding."""
    if attention_mask is None:
        return torch.arange(past, past + new_tokens, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + new_tokens]


def attention_mask_for(attention_mask, past, new_tokens, device):
    """The mask MultiHeadAttention takes: None where plain causal attention is right (no padding, nothing
    cached), else (batch or 1, 1, new_tokens, keys), True where a query may attend to a key. The keys are
    the past and new tokens, or as many as `attention_mask` (batch, keys) has columns (a StaticKVCache's
    slots, the later ones not written yet)."""
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
