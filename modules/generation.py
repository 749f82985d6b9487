"""Text generation: one token at a time, each chosen from the model's next-token distribution.

Greedy (temperature 0) takes the most likely token; otherwise logits are divided by the temperature
(lower = more conservative), optionally restricted to the top_k tokens and/or the smallest set whose
probability reaches top_p, and a token is sampled. A KV cache keeps the keys and values of the tokens
already seen, so each step runs the model on one new position instead of the whole sequence.

This file and modules/inference.py are the eager path. The fast one, a static KV cache and a compiled
step, is chosen by passing its decoder: generate(model, ids, 100, decoder=CompiledDecoder(model))
(modules/speed/compiled_generation.py); the loop below is the same for both.
"""
import codecs

import torch

from .inference import EagerDecoding
from .tokenizer import END_OF_TEXT_ID, encode, get_tokenizer


def sampling_logits(logits, temperature, top_k=None, top_p=None):
    """The logits a token is sampled from: (batch, vocab) logits divided by the temperature (> 0), with
    -inf for the tokens that top_k and top_p cut (modules/inspection.py shows the same cut in the app)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(batch, vocab) logits of the last position -> (batch,) chosen token ids."""
    logits = logits.float()  # the argmax of 50,257 bfloat16 logits took 209 us on 2 cores, converted first 58
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probabilities = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_tokens(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                  eos_token_id=None, generator=None, attention_mask=None, use_cache=True, decoder=None):
    """Yield the next token of every sequence, a (batch,) tensor per step.

    input_ids: (batch, tokens). Prompts longer than the context are cropped to their last tokens.
    attention_mask: (batch, tokens), False on the left padding of shorter prompts in a batch.
    eos_token_id: a sequence that produced it keeps producing it; the stream stops when all have.
    generator: a torch.Generator for reproducible sampling.
    use_cache: False runs the whole window at every step (the reference the KV cache is tested against).
    decoder: None for the eager path (EagerDecoding: a growing KV cache); a CompiledDecoder of this model
        (modules/speed/compiled_generation.py) for the static cache and the compiled step.
    """
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 is greedy)")
    context_size = model.config["context_size"]
    tokens = input_ids[:, -context_size:]
    if attention_mask is not None:
        attention_mask = attention_mask[:, -context_size:].bool()
    batch = tokens.shape[0]
    if decoder is None:
        decoding = EagerDecoding(model, batch, use_cache)
    else:
        decoding = decoder.start(model, batch, tokens.shape[1] + max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        if tokens.shape[1] > context_size:
            # The window slides: every token's position changes, so the cached keys are stale and the
            # window is recomputed. Only generation past the context length pays this.
            tokens = tokens[:, -context_size:]
            attention_mask = None if attention_mask is None else attention_mask[:, -context_size:]
            decoding.clear()
        logits = decoding.next_token_logits(tokens, attention_mask)
        next_token = pick_next_token(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        yield next_token
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        if finished.all():
            return


def generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
             generator=None, attention_mask=None, use_cache=True, decoder=None):
    """The input ids followed by up to `max_new_tokens` new ones, (batch, tokens + new).

    Generation ends early when every sequence has produced `eos_token_id` (which is kept). Arguments as
    stream_tokens's.
    """
    new_tokens = list(stream_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                                    eos_token_id, generator, attention_mask, use_cache, decoder))
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def prompt_ids(prompt, device):
    """The token ids of the text `prompt`, (1, tokens); an empty prompt starts from <|endoftext|>."""
    return torch.tensor([encode(prompt, get_tokenizer()) or [END_OF_TEXT_ID]], device=device)


def stream_text(model, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
                stop_at_end_of_text=True, decoder=None):
    """Yield the continuation of `prompt` as text pieces as soon as they are generated (for the app).

    prompt: the text, or its prompt_ids when the caller needed them first (the app counts them).
    decoder: as stream_tokens's (None: the eager path).
    A character can span several tokens (emoji, accented letters), so bytes are decoded incrementally
    and a piece is yielded only once it holds whole characters.
    """
    tokenizer = get_tokenizer()
    device = next(model.parameters()).device
    input_ids = prompt.to(device) if torch.is_tensor(prompt) else prompt_ids(prompt, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    eos = END_OF_TEXT_ID if stop_at_end_of_text else None
    for token in stream_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos, generator,
                               decoder=decoder):
        token_id = token.item()
        if token_id == eos:
            break
        piece = utf8.decode(tokenizer.decode_single_token_bytes(token_id))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail
