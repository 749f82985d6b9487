"""Where a training script's weights start from: the --init, --config and --models-dir flags, and what
they mean. "scratch" draws random weights for --config; a GPT-2 size loads OpenAI's weights (downloaded
into --models-dir once); a path loads a checkpoint of this project."""
from pathlib import Path

from ..checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from ..config import ConfigError, resolve_config
from ..errors import UserError
from ..model import GPTModel
from ..pretrained import MODEL_SIZES, download_gpt2, load_gpt2


def add_init_args(parser, *, init, config="tiny"):
    """--init, --config and --models-dir, with the script's default for --init."""
    group = parser.add_argument_group("model")
    group.add_argument("--init", default=init,
                       help=f"starting weights: 'scratch' (with --config), a GPT-2 size ({', '.join(MODEL_SIZES)}) "
                            "or a checkpoint path (default: %(default)s)")
    group.add_argument("--config", default=config, help="GPT_CONFIGS name or JSON file for --init scratch (default: %(default)s)")
    group.add_argument("--models-dir", default="gpt2", help="where OpenAI's weights are kept (default: %(default)s)")
    return group


def initial_model(init, config_name="tiny", kinds=("lm", "instruct"), models_dir="gpt2"):
    """The model --init asks for; a checkpoint must be of one of `kinds`."""
    if init == "scratch":
        try:
            return GPTModel(resolve_config(config_name))
        except ConfigError as error:
            raise UserError(f"--config: {error}") from None
    if init in MODEL_SIZES and not Path(init).exists():
        return load_gpt2(download_gpt2(init, models_dir))
    if not Path(init).exists():
        raise CheckpointError(f"--init {init}: no such checkpoint; use a checkpoint path, a GPT-2 size "
                              f"({', '.join(MODEL_SIZES)}) or 'scratch' with --config")
    return model_from_checkpoint(read_checkpoint(init, kinds), init)
