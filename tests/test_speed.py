"""The speed machinery (modules/speed/, modules/training/optimizer.py) computes what the plain versions compute."""
import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from modules import GPTModel, GPT_CONFIGS
from modules.generation import generate
from modules.training.optimizer import make_optimizer
from modules.speed import generation_dtype, prepare_for_generation
from modules.speed.int8 import Int8Linear, Int8WordsLinear
from tests.conftest import REPO, run_script

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

CONFIG = {**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 32}


def test_a_model_prepared_for_generation_is_the_plain_model_in_its_dtype():
    # No class is swapped and no kernel is chosen: the same nn.Linear modules, the same numbers.
    torch.manual_seed(0)
    plain = GPTModel(CONFIG).eval()
    prepared = prepare_for_generation(copy.deepcopy(plain), "float32")
    assert [type(module) for module in prepared.modules()] == [type(module) for module in plain.modules()]
    assert prepared.out_head.weight is prepared.token_embedding.weight  # still tied
    prompt = torch.randint(0, 50257, (3, 9))
    with torch.no_grad():
        assert torch.equal(prepared(prompt), plain(prompt))
    assert torch.equal(generate(prepared, prompt[:1], 12), generate(plain, prompt[:1], 12))


def test_the_project_calls_no_private_torch_operators():
    # Private operators (torch.ops.mkldnn._linear_pointwise and the like) change between releases unannounced.
    sources = [*REPO.glob("*.py"), *REPO.glob("modules/**/*.py"), *REPO.glob("app_pages/*.py")]
    calls = [f"{path.relative_to(REPO)}: {line.strip()}" for path in sources
             for line in path.read_text().splitlines() if "torch.ops." in line]
    assert not calls, calls


def test_optimizer_decays_matrices_only():
    optimizer = make_optimizer(GPTModel(CONFIG), lr=1e-3, weight_decay=0.1, device="cpu")
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert not_decayed["weight_decay"] == 0.0 and all(p.dim() < 2 for p in not_decayed["params"])
    assert len(decayed["params"]) == 1 + 1 + 4 * CONFIG["num_layers"]  # embeddings, 4 matrices a block


def test_optimizer_steps_like_plain_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1, device="cpu")
    plain = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), foreach=False)
    inputs = torch.randn(32, 8)
    for network, opt in ((model, optimizer), (reference, plain)):
        for _ in range(5):
            network(inputs).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_the_loss_is_compiled_as_the_flag_says_and_by_default_where_measured_faster():
    from modules.speed.compilation import loss_compilation

    assert loss_compilation(None, "cpu")[0] and not loss_compilation(None, "mps")[0]
    assert not loss_compilation(False, "cpu")[0] and loss_compilation(True, "mps")[0]
    assert "the default on cpu" in loss_compilation(None, "cpu")[1] and "as asked" in loss_compilation(False, "cpu")[1]

GREEDY_COMMAND = """
import torch
from modules import GPTModel, GPT_CONFIGS
from modules.generation import generate
from modules.speed import CompiledDecoder, prepare_for_generation
torch.manual_seed(0)
model = prepare_for_generation(GPTModel({**GPT_CONFIGS["tiny"], "num_layers": 2, "context_size": 64}).eval(), "auto")
print(generate(model, torch.randint(0, 50257, (1, 8)), 40, decoder=CompiledDecoder(model))[0, 8:].tolist())
"""


def test_ten_runs_of_one_greedy_command_give_the_same_tokens(tmp_path):
    # The first run compiles; the nine others, three at a time beside
    # a busy loop, must find all of it on disk: a choice timed afresh on a busy machine could differ.
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compiled")}
    first = run_script("-c", GREEDY_COMMAND, env=env)
    assert "Compiled the decoding step" in first.stderr
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with ThreadPoolExecutor(3) as pool:
            later = list(pool.map(lambda _: run_script("-c", GREEDY_COMMAND, env=env), range(9)))
    finally:
        busy.kill()
        busy.wait()
    assert all("from the on-disk cache" in run.stderr for run in later), later[0].stderr
    tokens = {run.stdout.strip().splitlines()[-1] for run in [first, *later]}
    assert len(tokens) == 1 and len(eval(tokens.pop())) == 40


@pytest.mark.parametrize("layer", [Int8Linear, Int8WordsLinear])
@pytest.mark.parametrize("in_features", [16, 18])  # 18: the last word of each row is half padding
def test_int8_weights_are_the_float_weights_rounded_per_row(layer, in_features):
    linear = torch.nn.Linear(in_features, 8)
    with torch.no_grad():
        linear.weight[0] *= 100  # a row of large weights must not cost the other rows their precision
    quantized = layer(linear)
    matrix = quantized.matrix()
    dequantized = matrix.float() * quantized.scales[:, None]
    assert matrix.dtype == torch.int8 and matrix.shape == (8, in_features) and quantized.scales.shape == (8,)
    assert torch.all((dequantized - linear.weight).abs() <= quantized.scales[:, None] / 2 + 1e-7)
    # Eager, every call takes the matrix product; compiled, a single row takes the pass over the matrix
    # (row_product, called here directly, then compiled as the decoding step compiles it): all are x W^T.
    for x in (torch.randn(3, in_features), torch.randn(1, in_features), torch.randn(1, 1, in_features)):
        torch.testing.assert_close(quantized(x), torch.nn.functional.linear(x, dequantized, linear.bias))
        if x.shape[:-1].numel() == 1:
            row_product = quantized.row_product(x) * quantized.scales + linear.bias.detach()
            torch.testing.assert_close(row_product, torch.nn.functional.linear(x, dequantized, linear.bias))
    x = torch.randn(1, 1, in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(quantized.to(torch.bfloat16), fullgraph=True, dynamic=False)(x)
    reference = torch.nn.functional.linear(x.float(), dequantized, linear.bias)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), reference, atol=0.05, rtol=0.02)


def test_int8_generation_keeps_most_greedy_tokens():
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    prompt = torch.randint(0, 50257, (4, 8))
    with torch.inference_mode():
        reference = model(prompt)
        int8 = prepare_for_generation(copy.deepcopy(model), "int8")
        assert generation_dtype(int8) == "int8" and not any(type(m) is torch.nn.Linear for m in int8.modules())
        agreement = (int8(prompt).argmax(-1) == reference.argmax(-1)).float().mean()
    assert agreement >= 0.9
