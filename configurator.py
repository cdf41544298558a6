"""Configuration, nanoGPT-style: a script's module globals are its config.

    python train.py config/train_7b.py --batch_size=8

Positional arguments are Python files executed in order; `--key=value` overrides follow. Values are parsed with
ast.literal_eval (a raw string when that fails). Only keys the script already defines can be set: an unknown key,
a wrong type or a missing file stops with a message that says what to do.
"""
import ast
import difflib
import os
import sys
import types

CONFIG_TYPES = (int, float, bool, str, dict, list, tuple, type(None))


def config_keys(namespace):
    """The configurable names of a script: public globals holding plain values."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv to `namespace` (a script's globals()); return the config dict."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"override {arg!r} has no value: write --{key}=VALUE")
            set_value(namespace, keys, key, parse(text), f"--{key}")
        else:
            apply_file(namespace, keys, arg)
    return {k: namespace[k] for k in keys}


def apply_file(namespace, keys, path):
    if not os.path.isfile(path):
        fail(f"config file {path!r} not found (config files live in config/, e.g. config/train_shakespeare_char.py)")
    scope = {k: namespace[k] for k in keys}
    exec(compile(open(path).read(), path, "exec"), scope)
    for key, value in scope.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # imports, helpers and builtins of the config file itself
        if key in keys and value is namespace[key]:
            continue
        set_value(namespace, keys, key, value, path)


def parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)  # bare words are strings


def set_value(namespace, keys, key, value, source):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see the globals at the top of the script"
        fail(f"{source}: unknown config key {key!r}; {hint}")
    default = namespace[key]
    if default is not None and not type_ok(value, default):
        fail(f"{source}: {key} must be {type(default).__name__} (like its default {default!r}), got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    namespace[key] = value


def type_ok(value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, str) or isinstance(default, dict):
        return isinstance(value, type(default)) or value is None
    return isinstance(value, type(default))


def fail(message):
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)
