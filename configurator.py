"""Configuration, nanoGPT-style: a script's module globals are its config.

    python train.py config/train_7b.py --batch_size=8
    python train.py --help                    # every setting with its default and the comment beside it

Positional arguments are Python files executed in order; `--key=value` overrides follow. Values are parsed with
ast.literal_eval (a bare word is a string; true/false are booleans). Only the script's lowercase globals holding
plain values can be set. A global's type is its default's, or its annotation: `x: bool | None = None` accepts
booleans and None, `x: Literal["a", "b"] = "a"` only the listed values; numbers must be finite. An unknown key, a
wrong type or value, a missing file or a config file that does not run stops with one line that says what to change.
"""
import ast
import difflib
import math
import os
import re
import sys
import traceback
import types
import typing

CONFIG_TYPES = (int, float, bool, str, dict, list, tuple, type(None))
_given = set()  # the keys the last configure() call set from files or overrides
SETTING_LINE = re.compile(r"^([a-z_][a-z0-9_]*)\s*(?::[^=]*)?=[^=].*?(?:#\s?(.*))?$")


def fail(message):
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def config_keys(namespace):
    """The configurable names of a script: public lowercase globals holding plain values (CAPS are constants)."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and k == k.lower() and k != "config" and isinstance(v, CONFIG_TYPES)]


def allowed_types(expected):
    """The types a plain or union annotation admits: (bool, NoneType) for `bool | None`."""
    return typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,)


def describe(expected):
    """'bool or None', "one of 'a', 'b'", 'int', ... for messages."""
    if typing.get_origin(expected) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(expected)))
    return " or ".join("None" if t is type(None) else t.__name__ for t in allowed_types(expected))


def expected_type(namespace, key):
    """The annotation of a global if it has one, else its default's type (float also takes int)."""
    annotation = namespace.get("__annotations__", {}).get(key)
    return annotation if annotation is not None else type(namespace[key])


def coerce(value, expected, from_command_line):
    """(ok, value): value checked against the expected type; ints become floats where a float is expected, and on
    the command line 1/0 are booleans."""
    if typing.get_origin(expected) is typing.Literal:
        return value in typing.get_args(expected) and type(value) in map(type, typing.get_args(expected)), value
    allowed = allowed_types(expected)
    if bool in allowed and from_command_line and type(value) is int and value in (0, 1):
        return True, bool(value)
    if type(value) is bool:  # bool is an int subclass: only a bool setting takes one
        return bool in allowed, value
    if float in allowed and type(value) is int:
        return True, float(value)
    if {list, tuple} & set(allowed) and isinstance(value, (list, tuple)):
        return True, value
    return isinstance(value, allowed), value


def non_finite(value):
    """Whether a value, or any number inside a list, tuple or dict of it, is inf or NaN (1e999 parses as inf)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(map(non_finite, value))
    if isinstance(value, dict):
        return any(map(non_finite, value.values()))
    return False


def set_value(namespace, keys, key, value, source):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `--help` for the settings"
        fail(f"{source}: unknown config key {key!r}; {hint}")
    expected = expected_type(namespace, key)
    ok, value = coerce(value, expected, source.startswith("--"))
    if not ok:
        fail(f"{source}: {key} must be {describe(expected)}, got {value!r}")
    if non_finite(value):
        fail(f"{source}: {key} must be a finite number, got {value!r}")
    namespace[key] = value
    _given.add(key)


def parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)  # bare words are strings


def apply_file(namespace, keys, path):
    if not os.path.isfile(path):
        fail(f"config file {path!r} not found (config files live in config/, e.g. config/train_shakespeare_char.py)")
    scope = {k: namespace[k] for k in keys}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        fail(f"{path}:{e.lineno}: {e.msg}: {(e.text or '').strip()}")
    except Exception as e:  # the line of the config file that raised, not the configurator's
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        fail(f"{path}:{line}: {type(e).__name__}: {e}")
    for key, value in scope.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # imports, helpers and builtins of the config file itself
        if key in keys and value is namespace[key]:
            continue
        set_value(namespace, keys, key, value, path)


def print_help(namespace, keys):
    """The script's docstring, then each setting as --key=default with the comment beside it in the source, under
    the source's section comments."""
    print((namespace.get("__doc__") or "").strip() + "\n")
    print("settings (python SCRIPT [config.py ...] [--key=value ...]):")
    seen = set()
    with open(namespace["__file__"]) as f:
        for line in f:
            match = SETTING_LINE.match(line.rstrip())
            if match and match.group(1) in keys and match.group(1) not in seen:
                key, comment = match.group(1), match.group(2) or ""
                seen.add(key)
                expected = expected_type(namespace, key)
                choices = f" [{describe(expected)}]" if typing.get_origin(expected) is typing.Literal else ""
                print(f"  --{key}={namespace[key]!r}".ljust(40) + f" {comment}{choices}".rstrip())
            elif line.startswith("# ") and not line.startswith("# --") and not seen >= set(keys):
                print(line.rstrip())


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv to `namespace` (a script's globals()); return the
    config dict. -h / --help prints the settings and exits."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    _given.clear()
    if "-h" in argv or "--help" in argv:
        print_help(namespace, keys)
        sys.exit(0)
    for key in keys:  # a default outside its own Literal is a bug in the script, caught at once
        if not coerce(namespace[key], expected_type(namespace, key), False)[0]:
            raise TypeError(f"default of {key} ({namespace[key]!r}) is not {describe(expected_type(namespace, key))}")
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"override {arg!r} has no value: write --{key}=VALUE")
            set_value(namespace, keys, key, parse(text), f"--{key}")
        else:
            apply_file(namespace, keys, arg)
    return {k: namespace[k] for k in keys}


def given():
    """The settings the last configure() call took from config files or --key=value (not left at their default)."""
    return set(_given)


def at_least(config, minimum, *names):
    """Stop with one line unless every named setting is >= minimum."""
    for name in names:
        if config[name] < minimum:
            fail(f"{name} must be >= {minimum}, got {config[name]!r}")


def require(ok, message):
    """Stop with one line (config error: message) unless ok."""
    if not ok:
        fail(message)
