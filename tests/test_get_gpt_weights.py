"""OpenAI's TensorFlow checkpoints and Hugging Face directories load into GPTModel with transformers' logits."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import get_gpt_weights
from modules.checkpoint import load_checkpoint
from modules.errors import UserError
from modules.pretrained import FILES, load_gpt2, load_gpt2_from_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorflow")
from tests.openai_layout import (  # noqa: E402
    gpt2_tensors_from_transformers, hparams_from_transformers, write_openai_checkpoint)

pytestmark = pytest.mark.slow  # not in the quick tier (python -m pytest -m "not slow")

ROOT = Path(__file__).resolve().parents[1]
# (vocab, context, embedding, heads, layers): GPT-2's real vocabulary, and an odd small one.
SHAPES = {"gpt2-vocab": (50257, 32, 16, 2, 2), "small-vocab": (300, 64, 48, 4, 3)}


def random_hf_gpt2(vocab, context, embedding, heads, layers, seed=0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=embedding, n_head=heads,
                                        n_layer=layers, bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random biases and norms too, so a swapped or untransposed tensor cannot hide
        for parameter in hf_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return hf_model


@pytest.fixture(scope="module")
def openai_dirs(tmp_path_factory):
    """{shape name: (transformers model, OpenAI-layout directory of the same weights)}."""
    dirs = {}
    for name, shape in SHAPES.items():
        hf_model = random_hf_gpt2(*shape)
        model_dir = write_openai_checkpoint(gpt2_tensors_from_transformers(hf_model),
                                            hparams_from_transformers(hf_model.config),
                                            tmp_path_factory.mktemp(name) / "124M")
        dirs[name] = hf_model, model_dir
    return dirs


def assert_same_logits(model, hf_model):
    input_ids = torch.randint(0, hf_model.config.vocab_size, (2, hf_model.config.n_positions))
    with torch.no_grad():
        difference = (model(input_ids) - hf_model(input_ids).logits).abs().max().item()
    assert difference <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_openai_checkpoint_gives_transformers_logits(openai_dirs, shape):
    hf_model, model_dir = openai_dirs[shape]
    model = load_gpt2(model_dir)
    assert (model.config["vocab_size"], model.config["context_size"], model.config["embedding_dim"],
            model.config["num_heads"], model.config["num_layers"]) == SHAPES[shape]
    assert not model.training and model.out_head.weight is model.token_embedding.weight
    assert_same_logits(model, hf_model)


def test_written_checkpoint_has_openais_exact_layout(openai_dirs):
    import tensorflow as tf

    _, model_dir = openai_dirs["small-vocab"]
    assert sorted(path.name for path in model_dir.iterdir()) == sorted(FILES)
    assert (model_dir / "checkpoint").read_text().startswith('model_checkpoint_path: "model.ckpt"')
    variables = dict(tf.train.list_variables(str(model_dir / "model.ckpt")))
    assert len(variables) == 4 + 12 * 3
    assert variables["model/h0/attn/c_attn/w"] == [1, 48, 144] and variables["model/h2/mlp/c_proj/w"] == [1, 192, 48]
    assert variables["model/wte"] == [300, 48] and variables["model/ln_f/g"] == [48]


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "pytorch_model.bin"])
def test_hugging_face_directory_gives_transformers_logits(tmp_path, weights):
    hf_model = random_hf_gpt2(*SHAPES["small-vocab"], seed=1)
    if weights == "pytorch_model.bin":
        hf_model.config.save_pretrained(tmp_path)
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(tmp_path, max_shard_size="50KB" if weights == "sharded" else "5GB")
    assert ((tmp_path / "model.safetensors.index.json").exists()) == (weights == "sharded")
    assert_same_logits(load_gpt2_from_hf(tmp_path), hf_model)


def test_variable_of_the_wrong_shape_is_named(tmp_path):
    hf_model = random_hf_gpt2(*SHAPES["small-vocab"])
    tensors = gpt2_tensors_from_transformers(hf_model)
    tensors["h1/mlp/c_fc/w"] = tensors["h1/mlp/c_fc/w"][:, :, :100]
    write_openai_checkpoint(tensors, hparams_from_transformers(hf_model.config), tmp_path)
    with pytest.raises(UserError, match=r"model/h1/mlp/c_fc/w .* has shape \[1, 48, 100\], .* needs \[1, 48, 192\]"):
        load_gpt2(tmp_path)


def test_hparams_that_do_not_match_the_variables(openai_dirs, tmp_path):
    model_dir = shutil.copytree(openai_dirs["small-vocab"][1], tmp_path / "124M")
    hparams = json.loads((model_dir / "hparams.json").read_text())
    (model_dir / "hparams.json").write_text(json.dumps({**hparams, "n_layer": 4}))
    with pytest.raises(UserError, match="weights that .* lacks: h3/"):
        load_gpt2(model_dir)
    (model_dir / "hparams.json").write_text(json.dumps({**hparams, "n_layer": 2}))
    with pytest.raises(UserError, match="model/h2/.* is not part of the model .* describes"):
        load_gpt2(model_dir)
    del hparams["n_embd"]
    (model_dir / "hparams.json").write_text(json.dumps(hparams))
    with pytest.raises(UserError, match="hparams.json lacks n_embd"):
        load_gpt2(model_dir)


def test_missing_or_truncated_files_explain_how_to_get_them(openai_dirs, tmp_path):
    with pytest.raises(UserError, match="hparams.json does not exist.*get_gpt_weights.py --model 124M"):
        load_gpt2(tmp_path)
    _, model_dir = openai_dirs["small-vocab"]
    (tmp_path / "hparams.json").write_bytes((model_dir / "hparams.json").read_bytes())
    with pytest.raises(UserError, match="no complete TensorFlow checkpoint"):
        load_gpt2(tmp_path)
    for name in FILES:
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:5000])
    with pytest.raises(UserError, match="could not read the checkpoint .* incomplete"):
        load_gpt2(tmp_path)


def test_directory_that_is_not_gpt2_on_hugging_face(tmp_path):
    with pytest.raises(UserError, match="config.json does not exist"):
        load_gpt2_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    with pytest.raises(UserError, match="holds a 'llama' model, not GPT-2"):
        load_gpt2_from_hf(tmp_path)
    transformers.GPT2Config(n_embd=16, n_head=2, n_layer=1, activation_function="relu").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="activation_function='relu'"):
        load_gpt2_from_hf(tmp_path)
    transformers.GPT2Config(n_embd=16, n_head=2, n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_gpt2_from_hf(tmp_path)


def test_cli_uses_complete_download_saves_lm_checkpoint_and_shows_a_sample(openai_dirs, tmp_path, monkeypatch,
                                                                          capsys):
    hf_model, model_dir = openai_dirs["gpt2-vocab"]
    # The files are all in <models-dir>/124M, so nothing is downloaded (this machine has no network).
    monkeypatch.setattr(sys, "argv", ["get_gpt_weights.py", "--model", "124M", "--models-dir", str(model_dir.parent),
                                      "--save", str(tmp_path / "gpt2.pt"), "--max-new-tokens", "5", "--device", "cpu"])
    get_gpt_weights.main()
    output = capsys.readouterr().out
    assert "already complete" in output and "Greedy continuation:\nEvery effort moves you" in output
    assert_same_logits(load_checkpoint(tmp_path / "gpt2.pt", kinds=("lm",)), hf_model)


def test_cli_error_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "get_gpt_weights.py"), "--model", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "hparams.json does not exist" in result.stderr


def test_tensorflow_is_only_imported_to_read_a_checkpoint():
    code = "import sys, get_gpt_weights, modules.checkpoint; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_the_package_imports_no_script_and_load_gpt2_stays_importable_from_the_script():
    code = ("import sys, modules.checkpoint, modules.pretrained; assert 'get_gpt_weights' not in sys.modules; "
            "from get_gpt_weights import load_gpt2; assert load_gpt2 is modules.pretrained.load_gpt2")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
