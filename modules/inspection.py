"""Inside the model: what GPT-2 computes for one prompt, in numbers a learner can look at.

For a prompt this gives its tokens as the model sees them, where each token looks (every layer's and
head's attention weights), how surprised the model was by each token (its loss), and the distribution
the next token is drawn from, before and after the sampling settings reshape it. The app's "Inside the
model" tab draws these; nothing here knows about Streamlit.

The attention weights are not a second model: `inspect_prompt` runs the model's own blocks one by one,
and before each block computes the weights from the queries and keys that block's attention makes of
the same input (`attention_weights`, the written-out form of the fused kernel the block runs).
tests/test_inspection.py checks that the logits equal those of `model(input_ids)`.
"""
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .attention import attention_weights
from .generation import sampling_logits
from .tokenizer import END_OF_TEXT_ID, encode, get_tokenizer


@dataclass
class Inspection:
    """One prompt through the model; tensors on the CPU, in float32.

    token_ids: the prompt's tokens (at most the context size).
    logits: (tokens, vocab_size or num_classes), as model(input_ids)[0].
    attention: (layers, heads, tokens, tokens); attention[layer, head, i, j] is how much token i attends
        to token j. Each row sums to 1 and is 0 above the diagonal (no token sees the future).
    """

    token_ids: list
    logits: torch.Tensor
    attention: torch.Tensor

    def surprise_bits(self):
        """(tokens - 1,) how surprised the model was by each token after the first, in bits: -log2 of
        the probability it gave that token from the tokens before it (its training loss, in bits)."""
        targets = torch.tensor(self.token_ids[1:])
        return F.cross_entropy(self.logits[:-1], targets, reduction="none") / math.log(2)


@torch.inference_mode()
def inspect_prompt(model, token_ids):
    """Run `model` on one prompt (a list of token ids) and keep every layer's attention weights.

    The steps are GPTModel.forward's, block by block, without generation's positions, mask or cache."""
    device = model.token_embedding.weight.device
    input_ids = torch.tensor([token_ids], device=device)
    positions = torch.arange(len(token_ids), device=device)
    x = model.dropout(model.token_embedding(input_ids) + model.position_embedding(positions))
    attention = []
    for block in model.blocks:
        queries, keys, _ = block.attention.split_heads(block.norm1(x))
        attention.append(attention_weights(queries, keys)[0])  # (heads, tokens, tokens)
        x = block(x)
    logits = model.out_head(model.final_norm(x))[0]
    return Inspection(list(token_ids), logits.float().cpu(), torch.stack(attention).float().cpu())


def prompt_token_ids(text, context_size):
    """The ids the model reads for `text`: an empty text is a lone <|endoftext|>, and a text longer than
    the context keeps its last tokens, as generation does."""
    return (encode(text) or [END_OF_TEXT_ID])[-context_size:]


def token_pieces(token_ids):
    """Each token's text. A character spread over several tokens (an emoji, say) shows as the escaped
    bytes each token holds, such as '\\xf0\\x9f'."""
    tokenizer = get_tokenizer()
    return [tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="backslashreplace")
            for token_id in token_ids]


def sampling_probabilities(logits, temperature, top_k=None, top_p=None):
    """(vocab,) logits -> the distribution generation draws the next token from with these settings.

    Temperature 0 is greedy decoding: all the probability on the most likely token. Otherwise the
    logits go through generation's own `sampling_logits`, so the tokens left with a probability above 0
    are exactly those that top_k and top_p let through, renormalised to sum to 1."""
    if temperature == 0:
        return F.one_hot(logits.argmax(), logits.shape[-1]).float()
    return sampling_logits(logits[None].float(), temperature, top_k, top_p)[0].softmax(dim=-1)
