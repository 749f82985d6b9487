"""FSDP on the CPU: two processes (gloo) against one unsharded process, on a tiny GPT-2.

Spawning processes costs most of the time here, so one pair of FSDP processes runs every sharded
scenario (training, resume, gathering, LoRA, activation checkpointing) and writes what it measured;
the tests compare that with one plain process in the test's own.
"""
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as multiprocessing

from modules.checkpoint import load_checkpoint, save_checkpoint
from modules.errors import UserError
from modules.lora import apply_lora, merged_state_dict
from modules.model import GPTModel
from modules.training import fsdp as fully_sharded
from modules.training.activation_checkpointing import checkpoint_activations
from modules.training.parallel import TrainingProcess
from modules.training.optimizer import make_optimizer
from modules.training.fsdp import load_sharded_state, read_train_state, save_sharded_state
from modules.training.fsdp import gathered_model, shard_model

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

CONFIG = {"vocab_size": 101, "context_size": 16, "embedding_dim": 32, "num_heads": 2, "num_layers": 3,
          "drop_rate": 0.0, "qkv_bias": True}
WORLD = 2
CPU = torch.device("cpu")
ALONE = TrainingProcess(0, 1, CPU)  # one process, no process group
STEPS, RESUME_AT = 6, 3
BATCH, MICRO_BATCH = 8, 2  # each of 2 processes: 2 micro-batches of 2 samples a step
CLIP = 0.05  # small enough that every step clips
LORA = {"rank": 4, "alpha": 8.0}


def local_numel(tensors):
    """Elements of `tensors` that this process holds: its shards of DTensors, all of a plain tensor."""
    return sum((tensor.to_local() if hasattr(tensor, "to_local") else tensor).numel() for tensor in tensors)


def tokens(step):
    """The global batch of `step`: (BATCH, context) inputs and targets, the same in every process; each
    sample counts up from a random token, a pattern that a few steps learn."""
    generator = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, CONFIG["vocab_size"], (BATCH, 1), generator=generator)
    data = (starts + torch.arange(CONFIG["context_size"] + 1)) % CONFIG["vocab_size"]
    return data[:, :-1], data[:, 1:]


def new_model(lora=False, drop_rate=0.0):
    torch.manual_seed(0)
    model = GPTModel({**CONFIG, "drop_rate": drop_rate})
    if lora:
        apply_lora(model, **LORA)
        model.out_head.requires_grad_(True)  # the tied matrix trains too: sharded, it must stay tied
    return model


def step_loss(model, optimizer, step, rank=0, world=1):
    """One optimizer step as the training loop takes it: this process's share of the global batch in
    micro-batches, gradients accumulated without a reduction until the last, clipped, then the update.
    Returns the mean loss over all processes."""
    inputs, targets = tokens(step)
    shares = list(zip(inputs[rank::world].split(MICRO_BATCH), targets[rank::world].split(MICRO_BATCH)))
    total = torch.zeros(())
    for index, (micro_inputs, micro_targets) in enumerate(shares):
        if world > 1:
            model.set_requires_gradient_sync(index == len(shares) - 1)
        logits = model(micro_inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro_targets.flatten()) / len(shares)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        torch_dist.all_reduce(total)
    return total.item() / world


def train(model, optimizer, steps, rank=0, world=1):
    return [step_loss(model, optimizer, step, rank, world) for step in steps]


def train_state(step):
    return {"progress": {"step": step}, "config": CONFIG}


# ---------------------------------------------------------------- the two FSDP processes
def _fsdp_process(rank, port, folder):
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    model = shard_model(new_model(), "float32", torch.device("cpu"))
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    results["losses"] = train(model, optimizer, range(RESUME_AT), rank, WORLD)
    save_sharded_state(folder / "state", model, optimizer, train_state(RESUME_AT), TrainingProcess(rank, WORLD, CPU))
    results["losses"] += train(model, optimizer, range(RESUME_AT, STEPS), rank, WORLD)
    results["local_parameters"] = local_numel(model.parameters())
    results["local_optimizer_state"] = local_numel(value for state in optimizer.state.values()
                                                   for key, value in state.items() if key != "step")
    results["tied"] = model.out_head.weight is model.token_embedding.weight
    whole = gathered_model(model)
    if rank == 0:
        save_checkpoint(folder / "gathered.pt", whole, "lm")

    # Resume under FSDP: a fresh sharded model and optimizer continue from the saved state.
    model = shard_model(new_model(), "float32", torch.device("cpu"))
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    load_sharded_state(read_train_state(folder / "state", CONFIG)[0], model, optimizer)
    results["resumed_losses"] = train(model, optimizer, range(RESUME_AT, STEPS), rank, WORLD)

    # LoRA: the frozen weights sharded too, the adapters (and the tied head) trained.
    model = shard_model(new_model(lora=True), "float32", torch.device("cpu"))
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    results["lora_losses"] = train(model, optimizer, range(3), rank, WORLD)
    whole = gathered_model(model)
    if rank == 0:
        save_checkpoint(folder / "lora.pt", whole, "lm")

    # Activation checkpointing inside the FSDP units, with dropout: the same losses as without.
    for checkpointed in (False, True):
        model = new_model(drop_rate=0.2)
        if checkpointed:
            checkpoint_activations(model)
        model = shard_model(model, "float32", torch.device("cpu"))
        optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
        torch.manual_seed(7)
        results[f"dropout_losses_{checkpointed}"] = train(model, optimizer, range(3), rank, WORLD)
    torch.save(results, folder / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def fsdp_results(folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multiprocessing.start_processes(_fsdp_process, args=(port, folder), nprocs=WORLD, start_method="spawn")
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    return folder, fsdp_results(folder)


def reference_run(steps, lora=False):
    """(model, losses) of one plain process over the first `steps` steps."""
    model = new_model(lora)
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    return model, train(model, optimizer, range(steps))


# ---------------------------------------------------------------- the tests
def test_two_fsdp_processes_train_as_one_unsharded_process(fsdp):
    _, results = fsdp
    _, losses = reference_run(STEPS)
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["losses"] == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]


def test_the_tied_head_stays_tied_when_sharded(fsdp):
    _, results = fsdp
    assert results[0]["tied"] and results[1]["tied"]


def test_each_fsdp_process_holds_half_of_the_parameters_and_optimizer_state(fsdp):
    _, results = fsdp
    parameters = sum(p.numel() for p in new_model().parameters())
    for result in results:
        assert result["local_parameters"] == pytest.approx(parameters / WORLD, rel=0.02)
        assert result["local_optimizer_state"] == pytest.approx(2 * parameters / WORLD, rel=0.02)  # two moments
    assert sum(result["local_parameters"] for result in results) == parameters


def test_the_gathered_checkpoint_holds_the_unsharded_models_weights(fsdp):
    folder, _ = fsdp
    model, _ = reference_run(STEPS)
    loaded = load_checkpoint(folder / "gathered.pt")
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4)
    assert loaded.out_head.weight is loaded.token_embedding.weight


def test_resume_under_fsdp_repeats_the_uninterrupted_losses(fsdp):
    _, results = fsdp
    assert results[0]["resumed_losses"] == pytest.approx(results[0]["losses"][RESUME_AT:], abs=1e-6)


def test_a_state_of_two_fsdp_processes_resumes_in_one_plain_process(fsdp):
    folder, results = fsdp
    model = new_model()
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    state_folder, state = read_train_state(folder / "state", CONFIG)
    assert state["progress"]["step"] == RESUME_AT
    load_sharded_state(state_folder, model, optimizer)
    losses = train(model, optimizer, range(RESUME_AT, STEPS))
    assert losses == pytest.approx(results[0]["losses"][RESUME_AT:], abs=1e-5)


def test_lora_trains_under_fsdp_as_in_one_process(fsdp):
    folder, results = fsdp
    model, losses = reference_run(3, lora=True)
    assert results[0]["lora_losses"] == pytest.approx(losses, abs=1e-5)
    loaded = load_checkpoint(folder / "lora.pt")  # merged: a plain GPTModel
    expected = merged_state_dict(model)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_under_fsdp_changes_no_loss(fsdp):
    _, results = fsdp
    assert results[0]["dropout_losses_True"] == results[0]["dropout_losses_False"]


def test_activation_checkpointing_changes_no_loss_or_gradient():
    inputs, targets = tokens(0)
    gradients, losses = [], []
    for checkpointed in (False, True):
        model = new_model(drop_rate=0.2)  # dropout: the recomputation must draw the same masks
        if checkpointed:
            checkpoint_activations(model)
        torch.manual_seed(5)
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        gradients.append({name: p.grad for name, p in model.state_dict(keep_vars=True).items()})
    assert losses[0] == losses[1]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=0, rtol=0)


def test_activation_checkpointing_keeps_only_the_blocks_inputs_for_the_backward_pass():
    def activations_kept(checkpointed):
        """How many numbers the backward pass keeps, not counting the weights it keeps in both runs."""
        model = new_model()
        if checkpointed:
            checkpoint_activations(model)
        weights = {p.data_ptr() for p in model.parameters()}
        kept = []

        def keep(tensor):
            if tensor.data_ptr() not in weights:
                kept.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(tokens(0)[0]).sum().backward()
        return sum(kept)

    assert activations_kept(True) < activations_kept(False) / 2


def test_activation_checkpointing_leaves_the_state_dict_and_evaluation_unchanged():
    model = new_model()
    names = list(model.state_dict())
    checkpoint_activations(model)
    assert list(model.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(model(tokens(0)[0]), new_model()(tokens(0)[0]))


def test_a_checkpointed_lora_model_saves_the_merged_weights_of_a_plain_one():
    plain, checkpointed = new_model(lora=True), checkpoint_activations(new_model(lora=True))
    expected, merged = merged_state_dict(plain), merged_state_dict(checkpointed)
    assert list(merged) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=0, rtol=0)


def test_a_state_of_another_model_is_refused_in_one_line(tmp_path):
    model = new_model()
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    train(model, optimizer, range(1))
    save_sharded_state(tmp_path, model, optimizer, train_state(1), ALONE)
    other_config = {**CONFIG, "num_layers": 2}
    with pytest.raises(UserError, match="different model"):
        read_train_state(tmp_path, other_config)
    lora = new_model(lora=True)  # the same config, other tensors
    with pytest.raises(UserError, match="different model.*"):
        load_sharded_state(read_train_state(tmp_path, CONFIG)[0], lora, make_optimizer(lora, 1e-2, 0.1, "cpu"))
    with pytest.raises(UserError, match="nothing to resume"):
        read_train_state(tmp_path / "elsewhere", CONFIG)


def test_an_interrupted_save_leaves_the_previous_state_usable(tmp_path, monkeypatch):
    model = new_model()
    optimizer = make_optimizer(model, 1e-2, 0.1, "cpu")
    train(model, optimizer, range(1))
    save_sharded_state(tmp_path, model, optimizer, train_state(1), ALONE)
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train(model, optimizer, range(1, 2))

    def interrupted(state_dict, checkpoint_id, no_dist):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fully_sharded.dcp, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_sharded_state(tmp_path, model, optimizer, train_state(2), ALONE)
    monkeypatch.undo()
    state_folder, state = read_train_state(tmp_path, CONFIG)
    assert state["progress"]["step"] == 1
    fresh = new_model()
    load_sharded_state(state_folder, fresh, make_optimizer(fresh, 1e-2, 0.1, "cpu"))
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], atol=0, rtol=0)
