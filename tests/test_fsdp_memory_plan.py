"""The memory plan: its activation bytes against what autograd really keeps, and its advice."""
import pytest
import torch

from modules.config import GPT_CONFIGS
from modules.errors import UserError
from modules.lora import apply_lora
from modules.model import GPTModel
from modules.training.memory_plan import GB, RunShape, check_fits, plan_memory

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

CONFIG = {"vocab_size": 64, "context_size": 128, "embedding_dim": 128, "num_heads": 4, "num_layers": 2,
          "drop_rate": 0.0, "qkv_bias": True}


def saved_bytes(model, input_ids, dtype):
    """Bytes of the tensors the forward pass keeps for the backward pass, parameters and their 16-bit
    copies (weights, not activations) left out; each storage counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        is_weight_copy = tensor.grad_fn is not None and tensor.grad_fn.name() == "TBackward0"
        if storage.data_ptr() not in parameters and not is_weight_copy:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(input_ids)
    return sum(kept.values())


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_planned_activations_of_a_block_are_what_autograd_keeps(dtype, drop_rate):
    micro_batch, measured, planned = 2, [], []
    for layers in (2, 4):
        config = {**CONFIG, "num_layers": layers, "drop_rate": drop_rate}
        torch.manual_seed(0)
        model = GPTModel(config).train()
        input_ids = torch.randint(0, config["vocab_size"], (micro_batch, config["context_size"]))
        measured.append(saved_bytes(model, input_ids, dtype))
        shape = RunShape("one process", 1, micro_batch, config["context_size"], dtype.itemsize, device_type="cpu")
        planned.append(plan_memory(model, shape).activations)
    # Two more blocks: what they keep, against what the plan says they keep.
    assert planned[1] - planned[0] == pytest.approx(measured[1] - measured[0], rel=0.1)


def meta_model(size, lora_rank=None):
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIGS[size])
        return apply_lora(model, lora_rank, lora_rank) if lora_rank else model


def test_fsdp_plans_a_share_of_the_weights_gradients_and_optimizer_state():
    model = meta_model("774M")
    parameters = sum(p.numel() for p in model.parameters())
    ddp = plan_memory(model, RunShape("ddp", 2, 1, 256, 4))
    fsdp = {n: plan_memory(model, RunShape("fsdp", n, 1, 256, 4)) for n in (2, 4)}
    assert ddp.weights + ddp.optimizer == 12 * parameters  # float32 weights and two moments
    assert fsdp[2].optimizer == pytest.approx(ddp.optimizer / 2) and fsdp[4].optimizer == pytest.approx(ddp.optimizer / 4)
    assert fsdp[2].weights - fsdp[4].weights == pytest.approx(4 * parameters / 4)  # 1/2 - 1/4 of the shards
    assert fsdp[2].total < ddp.total / 1.5


def test_activation_checkpointing_and_lora_plan_less():
    shape = RunShape("one process", 1, 4, 1024, 2)
    plain = plan_memory(meta_model("355M"), shape)
    checkpointed = plan_memory(meta_model("355M"), RunShape("one process", 1, 4, 1024, 2, activation_checkpointing=True))
    lora = plan_memory(meta_model("355M", lora_rank=16), shape)
    assert checkpointed.activations < plain.activations / 2  # the logits stay: 2.9 of its 3.5 GB
    assert lora.optimizer < plain.optimizer / 50 and lora.gradients < plain.gradients / 50


def test_a_run_that_does_not_fit_names_the_flag_that_would_make_it_fit():
    gpu = 24 * 2**30
    with pytest.raises(UserError, match="does not fit") as error:
        check_fits(meta_model("1558M"), RunShape("ddp", 2, 1, 1024, 2), gpu)
    assert "--parallel fsdp would make it fit" in str(error.value)
    with pytest.raises(UserError, match="--activation-checkpointing would make it fit"):
        check_fits(meta_model("774M"), RunShape("one process", 1, 8, 1024, 2), gpu)
    plan = check_fits(meta_model("1558M"), RunShape("fsdp", 2, 1, 1024, 2), gpu)
    assert plan.total < gpu
    with pytest.raises(UserError, match="no flag makes it fit"):
        check_fits(meta_model("1558M"), RunShape("fsdp", 64, 1, 1024, 2, activation_checkpointing=True), 1 * GB)
