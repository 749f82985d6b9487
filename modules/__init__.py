"""GPT-2 from scratch: the model and everything the scripts share."""
from .config import GPT_CONFIGS
from .model import GPTModel
from .tokenizer import get_tokenizer

__all__ = ["GPTModel", "GPT_CONFIGS", "get_tokenizer"]
