import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Linear):
    """nn.Linear, with a faster CPU kernel for generation.

    Generating a token multiplies one vector per sequence by every weight matrix of the model, so its
    speed is the speed at which the weights stream from memory. For such few-row products PyTorch's
    default CPU kernel (MKL's) uses a single core, which on its own reaches only part of the memory
    bandwidth; oneDNN's kernel (the one torch.compile picks for linear layers on CPU) spreads the rows
    of the weight over every core (benchmarks/: 25 against 15 GB/s on 2 cores, 2.5x at batch 8).
    It has no backward pass, hence only without gradients; it equals F.linear up to float rounding.
    """

    # False runs F.linear everywhere (e.g. to compare the two).
    use_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    # oneDNN costs ~25 us more per call: worth it once streaming the weight takes longer than that.
    onednn_min_weight_elements = 2**19  # 2 MB of fp32, e.g. GPT-2 124M's 768 x 768
    # Beyond a few rows MKL's kernel uses every core too (and is the faster one in large products).
    onednn_max_rows = 64

    def forward(self, x):
        if self._onednn_is_faster(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _onednn_is_faster(self, x):
        return (self.use_onednn and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and torch.get_num_threads() > 1
                and self.weight.numel() >= self.onednn_min_weight_elements
                and x.numel() <= self.onednn_max_rows * x.shape[-1])
