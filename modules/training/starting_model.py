"""Where a training script's weights start from: the --init, --config and --models-dir flags, and what
they mean. "scratch" draws random weights for --config; a GPT-2 size loads OpenAI's weights (downloaded
into --models-dir once); a path loads a checkpoint of this project."""
from pathlib import Path

from ..checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from ..config import ConfigError, resolve_config
from ..errors import UserError
from ..model import GPTModel

# The sizes of OpenAI's GPT-2 (modules/pretrained/openai.py's MODEL_SIZES, written here so that a run from
# scratch or from a checkpoint imports none of the download and TensorFlow-reading code).
GPT2_SIZES = ("124M", "355M", "774M", "1558M")


def add_init_args(parser, *, init, config="tiny"):
    """--init, --config and --models-dir, with the script's default for --init."""
    group = parser.add_argument_group("model")
    group.add_argument("--init", default=init,
                       help=f"starting weights: 'scratch' (with --config), a GPT-2 size ({', '.join(GPT2_SIZES)}) "
                            "or a checkpoint path (default: %(default)s)")
    group.add_argument("--config", default=config, help="GPT_CONFIGS name or JSON file for --init scratch (default: %(default)s)")
    group.add_argument("--models-dir", default="gpt2", help="where OpenAI's weights are kept (default: %(default)s)")
    return group


def starting_model(args, process, kinds=("lm", "instruct")):
    """The model the flags of add_init_args ask for; a checkpoint must be of one of `kinds`. The main
    process loads it first, so that a download of OpenAI's weights happens once."""
    with process.main_process_first():
        return initial_model(args.init, args.config, kinds, args.models_dir)


def initial_model(init, config_name="tiny", kinds=("lm", "instruct"), models_dir="gpt2"):
    """The model --init asks for; a checkpoint must be of one of `kinds`."""
    if init == "scratch":
        try:
            return GPTModel(resolve_config(config_name))
        except ConfigError as error:
            raise UserError(f"--config: {error}") from None
    if init in GPT2_SIZES and not Path(init).exists():
        from ..pretrained import download_gpt2, load_gpt2
        return load_gpt2(download_gpt2(init, models_dir))
    if not Path(init).exists():
        raise CheckpointError(f"--init {init}: no such checkpoint; use a checkpoint path, a GPT-2 size "
                              f"({', '.join(GPT2_SIZES)}) or 'scratch' with --config")
    return model_from_checkpoint(read_checkpoint(init, kinds), init)


def parameter_summary(model):
    """"11,520,000 parameters (450,816 trained)": what a script says about its model before training."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"{total:,} parameters ({trained:,} trained)"
