"""Bad input to the commands and tools not covered elsewhere: one line naming the file, non-zero exit, no traceback."""
import pytest
from conftest import run_script


def assert_one_line(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr


@pytest.mark.parametrize("layout", ["missing", "empty", "damaged step"])
def test_consolidate_without_a_readable_sharded_checkpoint_is_one_line(tmp_path, layout):
    out = tmp_path / "run"
    if layout != "missing":
        out.mkdir()
    if layout == "damaged step":
        (out / "step_1").mkdir()
        (out / "step_1" / "meta.pt").write_bytes(b"x")
        (out / "step_1" / ".metadata").write_bytes(b"junk")
    assert_one_line(run_script("tools/consolidate.py", str(out), check=False), "consolidate", str(out))
    assert not (out / "ckpt.pt").exists()


def test_consolidate_writes_the_newest_step_as_one_checkpoint(tmp_path, seed):
    """The good path beside the refusals: a step_N/ folder (DCP shards + meta.pt) becomes ckpt.pt, tensors equal."""
    from dataclasses import asdict

    import torch
    import torch.distributed.checkpoint as dcp

    from model import GPT, GPTConfig
    from nanogpt.checkpoint import load_checkpoint, save_checkpoint
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=37))
    for step in ("step_000002", "step_000004"):  # the newest one counts
        with torch.no_grad():
            model.wte.weight.add_(1.0)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / step))
        save_checkpoint({"model_args": asdict(model.config), "iter_num": int(step[5:]),
                         "tokenizer": {"kind": "char", "chars": "".join(map(chr, range(65, 102)))}},
                        str(tmp_path / step / "meta.pt"))
    result = run_script("tools/consolidate.py", str(tmp_path))
    assert "step_000004" in result.stdout
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 4
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
