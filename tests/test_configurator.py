"""configurator.py: files, overrides, and the errors for unknown keys, wrong types and missing files."""
import pytest

from configurator import configure


def namespace():
    return {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "dataset": "shakespeare_char",
            "datasets": {}, "init_from": "scratch", "maybe": None, "__name__": "x"}


def test_overrides_parse_literals_and_strings():
    ns = namespace()
    cfg = configure(ns, ["--batch_size=8", "--learning_rate=1", "--compile=False", "--dataset=fineweb10B",
                         "--datasets={'a': 0.9, 'b': 0.1}", "--maybe=[1, 2]"])
    assert ns["batch_size"] == 8 and ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)
    assert ns["compile"] is False and ns["dataset"] == "fineweb10B" and ns["datasets"] == {"a": 0.9, "b": 0.1}
    assert cfg["maybe"] == [1, 2] and "__name__" not in cfg


def test_config_file_then_override(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nbatch_size = 4 * 2\nlearning_rate = math.sqrt(4) * 1e-3\n_private = 1\n")
    ns = namespace()
    configure(ns, [str(path), "--batch_size=3"])
    assert ns["batch_size"] == 3 and ns["learning_rate"] == pytest.approx(2e-3)


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown config key 'batch_sise'; did you mean batch_size"),
    (["--batch_size=0.5"], "batch_size must be int"),
    (["--compile=1"], "compile must be bool"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--batch_size"], "has no value"),
    (["config/nope.py"], "config file 'config/nope.py' not found"),
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
