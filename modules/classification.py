"""Classification with a GPT: the head reads the hidden state of a message's last real token.

Causal attention means only the last token has seen the whole message, so that is the position to
classify from. In a padded batch the last position is padding (the original read position -1 and so
classified padding); here each message is read at its own last real token.
"""
import torch

from .checkpoint import model_from_state_dict
from .model import init_weights
from .tokenizer import END_OF_TEXT_ID, encode, get_tokenizer


def classifier_from_lm(model, num_classes, drop_rate=None):
    """A GPTModel with `model`'s weights whose head scores `num_classes` classes instead of tokens.

    The language-model head (tied to the token embedding) gives way to a new Linear, initialised like
    the model's other layers; drop_rate, when given, replaces the model's dropout rate."""
    config = {**model.config, "num_classes": num_classes}
    if drop_rate is not None:
        config["drop_rate"] = drop_rate
    head = torch.nn.Linear(config["embedding_dim"], num_classes)
    init_weights(head)
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("out_head.")}
    state.update({f"out_head.{name}": tensor for name, tensor in head.state_dict().items()})
    return model_from_state_dict(config, state)


def encode_for_classification(texts, max_length, tokenizer=None):
    """Token ids of each text truncated to `max_length`, right-padded with <|endoftext|> into one batch.

    Returns (input_ids, lengths): lengths are the number of real tokens, at least 1 (an empty text is
    read as a lone <|endoftext|>)."""
    tokenizer = tokenizer or get_tokenizer()
    encoded = [encode(text, tokenizer)[:max_length] or [END_OF_TEXT_ID] for text in texts]
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), longest), END_OF_TEXT_ID, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    return input_ids, torch.tensor([len(ids) for ids in encoded])


def last_token_logits(model, input_ids, lengths):
    """(batch, num_classes) logits read at each sequence's last real token (position length - 1)."""
    logits = model(input_ids)
    return logits[torch.arange(len(lengths), device=logits.device), lengths.to(logits.device) - 1]


@torch.inference_mode()
def classify(model, text, label_names=None, max_length=None, tokenizer=None):
    """(label, probability) for one text.

    label_names and max_length are those the classifier was trained with (a classifier checkpoint's
    metadata holds both: classify(loaded.model, text, **classifier_settings(loaded.metadata))); without
    them the labels are the class numbers and the text is read up to the context size."""
    device = next(model.parameters()).device
    input_ids, lengths = encode_for_classification([text], max_length or model.config["context_size"], tokenizer)
    probabilities = last_token_logits(model, input_ids.to(device), lengths).softmax(dim=-1)[0]
    best = int(probabilities.argmax())
    return (label_names or class_numbers(len(probabilities)))[best], float(probabilities[best])


def classifier_settings(metadata):
    """What classify() takes from a classifier checkpoint's metadata: its label names and max length."""
    return {"label_names": metadata.get("label_names"), "max_length": metadata.get("max_length")}


def class_numbers(num_classes):
    """The labels of classes without names: "0", "1", ..."""
    return [str(index) for index in range(num_classes)]
