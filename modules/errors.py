import sys
import traceback


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag, no network): printed as one message."""


def check_flag(name, value, is_valid, constraint):
    """Raise a UserError naming the flag `--name` when `value` is given (not None) and not valid:
    check_flag("lr", -1.0, lambda lr: lr > 0, "> 0") -> "--lr must be > 0, not -1.0"."""
    if value is not None and not is_valid(value):
        raise UserError(f"--{name.replace('_', '-')} must be {constraint}, not {value}")


def run_main(main):
    """Run a script's main(): a UserError ends with its message and exit status 1, Ctrl-C with 130,
    never with a traceback. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(2)
