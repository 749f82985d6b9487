"""--preset NAME: a named set of defaults for a script's flags.

Each script lists its presets beside its flags (fine_tune_instructional.py, fine_tune_classifier.py,
evaluate_responses.py have `original`, the settings of the project this one re-implements). A preset
changes defaults only, so a flag given on the command line still wins: `--preset original --epochs 1`
runs the original's settings for one epoch, and `--preset original --help` shows the defaults it sets.
"""
import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """`defaults`: {argparse dest: value}; `note`: what the preset does differently from what it copies."""

    defaults: dict
    note: str = ""

    def describe(self):
        """The flags this preset sets, as they would be typed: "--init 774M --batch-size 2 ..."."""
        return " ".join(_as_flag(dest, value) for dest, value in self.defaults.items())


def parse_with_presets(parser, presets, argv=None):
    """Parse `argv` (None: sys.argv) with `parser` plus a --preset flag choosing among `presets`
    ({name: Preset}): the chosen preset's defaults replace the parser's, then the flags given apply."""
    help_text = " ".join(f"{name}: make these the defaults: {preset.describe()}. {preset.note}"
                         for name, preset in presets.items())
    parser.add_argument("--preset", choices=list(presets), default=None,
                        help=help_text.replace("%", "%%"))  # argparse reads % in help as a format
    # A first look for --preset alone puts its defaults in place before the real parse (and --help);
    # a name that is not a preset is left for the real parse to refuse.
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--preset")
    chosen = finder.parse_known_args(argv)[0].preset
    if chosen in presets:
        _use_preset(parser, chosen, presets[chosen])
    return parser.parse_args(argv)


def _use_preset(parser, name, preset):
    """Make the preset's values the parser's defaults, and say so in the help of flags whose help
    describes their default in words rather than showing it."""
    actions = {action.dest: action for action in parser._actions}
    unknown = set(preset.defaults) - set(actions)
    if unknown:
        raise ValueError(f"preset {name!r} sets {sorted(unknown)}, which are not flags of {parser.prog}")
    parser.set_defaults(**preset.defaults)
    for dest in preset.defaults:
        action = actions[dest]
        if action.help and "%(default)" not in action.help:
            action.help += f" (--preset {name}: {_as_flag(dest, preset.defaults[dest])})".replace("%", "%%")


def _as_flag(dest, value):
    return f"--{dest.replace('_', '-')} {value}"
