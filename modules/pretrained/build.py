"""What both loaders share: our config from the file that describes the model, and a GPTModel built
from stored tensors after every shape has been checked."""
from ..checkpoint import empty_model, model_from_state_dict
from ..config import ConfigError, validate_config
from ..errors import UserError

from .names import convert_gpt2_weights, gpt2_name_to_ours, gpt2_names


def build_gpt2(config, variables, read_tensor, config_path):
    """GPTModel (eval mode, float32) from {OpenAI name: (stored name, stored shape)}, reading each tensor once
    with read_tensor(stored name).

    Every shape is checked before a byte of weights is read, so a mismatch costs nothing and names
    the variable. The largest tensors are read first: the one extra copy a transpose makes then
    happens while little else is in memory, which keeps the peak near one copy of the model."""
    expected = _expected_shapes(config)
    missing = [name for name in expected if name not in variables]
    if missing:
        raise UserError(f"{config_path} describes a model with weights that {config_path.parent} lacks: "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, (stored_name, stored_shape) in variables.items():
        if name in expected:
            needed = _stored_shape(name, stored_shape, expected[name])
            if list(stored_shape) != needed:
                raise UserError(f"{stored_name} in {config_path.parent} has shape {list(stored_shape)}, but "
                                f"{config_path} describes a model that needs {needed}")
        elif gpt2_name_to_ours(name) is not None:
            raise UserError(f"{stored_name} in {config_path.parent} is not part of the model {config_path} "
                            f"describes ({config['num_layers']} layers)")
    largest_first = sorted(expected, key=lambda name: -expected[name].numel())
    tensors = ((name, read_tensor(variables[name][0]).float()) for name in largest_first)
    return model_from_state_dict(config, convert_gpt2_weights(tensors)).eval()


def config_from(values, key_map, path):
    """Our config dict from a hparams.json / config.json dict, using key_map {their key: our key}."""
    missing = [key for key in key_map if values.get(key) is None]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it needs {', '.join(key_map)}")
    # GPT-2 trained with dropout 0.1 (what fine-tuning starts from); in eval mode it does nothing.
    config = {ours: values[theirs] for theirs, ours in key_map.items()} | {"drop_rate": 0.1, "qkv_bias": True}
    try:
        return validate_config(config)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def _expected_shapes(config):
    """{OpenAI name: our parameter's shape} for every weight a model of `config` has."""
    state_dict = empty_model(config).state_dict()
    return {name: state_dict[gpt2_name_to_ours(name)].shape for name in gpt2_names(config["num_layers"])}


def _stored_shape(name, stored_shape, our_shape):
    """The shape a checkpoint must store for our `our_shape`: Conv1D weights are (in, out), after
    a leading 1 in OpenAI's files ([1, in, out]) and none in Hugging Face's."""
    if name.endswith("/w"):
        return [1] * max(len(stored_shape) - 2, 0) + list(reversed(our_shape))
    return list(our_shape)
