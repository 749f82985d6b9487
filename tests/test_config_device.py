import json

import pytest
import torch

from modules.config import ConfigError, resolve_config
from modules.device import get_device
from modules.errors import UserError


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="124M, 355M, 774M, 1558M, tiny"):
        resolve_config("huge")


def test_json_config_checks_divisibility(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"embedding_dim": 100, "num_heads": 3}))
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        resolve_config(str(path))
    path.write_text(json.dumps({"embedding_dim": 96, "num_heads": 3, "num_layers": 2}))
    assert resolve_config(str(path))["embedding_dim"] == 96


def test_device_default_and_unavailable():
    assert get_device(None).type in ("cuda", "mps", "cpu")
    assert get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available.*cpu"):
            get_device("cuda")
