import torch
from torch import nn
from torch.nn import functional as F


def _has_onednn_linear():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """nn.Linear, with a faster CPU kernel where no gradient is needed (generation, evaluation).

    Generating a token multiplies one vector per sequence by every weight matrix of the model, so its
    speed is the speed at which the weights stream from memory. For such few-row products PyTorch's
    default CPU kernel (MKL) runs on one core and, on AMD CPUs, reads the weights at about half of the
    memory bandwidth; oneDNN's kernel (the one torch.compile picks for linear layers on CPU) uses every
    core and reads them close to the bandwidth (benchmarks/: 25 against 15 GB/s, 2x for batch 8).
    It has no backward pass, hence only without gradients; it equals F.linear up to float rounding.
    """

    # False runs F.linear everywhere (e.g. to compare the two).
    use_onednn = _has_onednn_linear()

    def forward(self, x):
        if self.use_onednn and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
