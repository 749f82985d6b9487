"""Building a model around weights that already exist, without drawing random ones first.

GPTModel(config) initialises every weight at random, as training from scratch needs: for GPT-2 124M
that is 124 million random numbers, about a second on 2 CPU cores, thrown away at once when a checkpoint
or OpenAI's weights are loaded. Here the model is built on the meta device (shapes, no memory) and
the loaded tensors become its parameters.

nn.init's functions still run on the meta device, and some of them (normal_) go through a Python
reference implementation whose first use imports torch._dynamo: about 2 s, once per process. A
TorchFunctionMode, active only around the construction and only in this thread, skips them; the
same mechanism is what `with torch.device("meta")` itself uses.
"""
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..model import GPTModel

_INITIALISERS = frozenset(
    getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
)


class _SkipInitialisers(TorchFunctionMode):
    """Within this mode, nn.init's functions leave their tensor as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITIALISERS:
            return args[0] if args else kwargs["tensor"]  # nn.init passes its tensor by keyword
        return func(*args, **(kwargs or {}))


def empty_model(config):
    """The model's structure with no weights (parameters on the meta device): shapes at no cost."""
    with torch.device("meta"), _SkipInitialisers():
        return GPTModel(config)


def model_from_state_dict(config, state_dict):
    """A GPTModel holding the tensors of `state_dict` (no copies), built without a random initialisation."""
    model = empty_model(config)
    model.load_state_dict(state_dict, assign=True)
    if not model.config.get("num_classes"):
        model.tie_weights()  # assign=True replaced the shared Parameter by two
    return model
