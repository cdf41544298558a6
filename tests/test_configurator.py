"""configurator.py: files, overrides, and the errors for unknown keys, wrong types and missing files."""
from typing import Literal

import pytest

from configurator import configure


def namespace():
    return {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "dataset": "shakespeare_char",
            "datasets": {}, "init_from": "scratch", "maybe": None, "mode": "cosine", "__name__": "x",
            "__annotations__": {"maybe": bool | None, "mode": Literal["cosine", "wsd"]}, "CONSTANT": 3}


def test_overrides_parse_literals_and_strings():
    ns = namespace()
    cfg = configure(ns, ["--batch_size=8", "--learning_rate=1", "--compile=0", "--dataset=fineweb10B",
                         "--datasets={'a': 0.9, 'b': 0.1}", "--maybe=true", "--mode=wsd"])
    assert ns["batch_size"] == 8 and ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)
    assert ns["compile"] is False and ns["dataset"] == "fineweb10B" and ns["datasets"] == {"a": 0.9, "b": 0.1}
    assert cfg["maybe"] is True and cfg["mode"] == "wsd" and "__name__" not in cfg and "CONSTANT" not in cfg
    for text, value in (("True", True), ("false", False), ("1", True), ("None", None)):
        assert configure(namespace(), [f"--maybe={text}"])["maybe"] is value


def test_config_file_then_override(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nbatch_size = 4 * 2\nlearning_rate = math.sqrt(4) * 1e-3\n_private = 1\n")
    ns = namespace()
    configure(ns, [str(path), "--batch_size=3"])
    assert ns["batch_size"] == 3 and ns["learning_rate"] == pytest.approx(2e-3)


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown config key 'batch_sise'; did you mean batch_size"),
    (["--batch_size=0.5"], "batch_size must be int"),
    (["--compile=no"], "compile must be bool, got 'no'"),
    (["--compile=2"], "compile must be bool, got 2"),
    (["--maybe=x"], "maybe must be bool or None, got 'x'"),
    (["--mode=fast"], "mode must be one of 'cosine', 'wsd', got 'fast'"),
    (["--dataset=None"], "dataset must be str, got None"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--batch_size"], "has no value"),
    (["config/nope.py"], "config file 'config/nope.py' not found"),
    (["--learning_rate=1e999"], "learning_rate must be a finite number, got inf"),
    (["--learning_rate=-1e999"], "learning_rate must be a finite number, got -inf"),
    (["--datasets={'a': 1e999}"], "datasets must be a finite number, got {'a': inf}"),
])
def test_errors_say_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configure(namespace(), argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("learning_rat = 1e-3\n")
    with pytest.raises(SystemExit):
        configure(namespace(), [str(path)])
    assert "unknown config key 'learning_rat'; did you mean learning_rate" in capsys.readouterr().err


def test_config_file_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nlearning_rate = (1e-3\n")
    with pytest.raises(SystemExit):
        configure(namespace(), [str(bad)])
    assert f"{bad}:2:" in capsys.readouterr().err
    bad.write_text("batch_size = 4\nlearning_rate = undefined_name * 2\n")
    with pytest.raises(SystemExit):
        configure(namespace(), [str(bad)])
    assert f"{bad}:2: NameError" in capsys.readouterr().err


def test_a_boolean_from_a_config_file_must_be_a_boolean(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("compile = 'no'\n")
    with pytest.raises(SystemExit):
        configure(namespace(), [str(path)])
    assert "compile must be bool, got 'no'" in capsys.readouterr().err


def test_help_lists_settings_with_defaults_and_comments(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text('"""A script."""\n# data\nbatch_size = 12            # rows per step\n'
                      'mode = "cosine"  # schedule\n')
    ns = dict(namespace(), __file__=str(script), __doc__="A script.")
    with pytest.raises(SystemExit) as exit_info:
        configure(ns, ["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("A script.")
    assert "# data" in out and "--batch_size=12" in out and "rows per step" in out
    assert "--mode='cosine'" in out and "[one of 'cosine', 'wsd']" in out
