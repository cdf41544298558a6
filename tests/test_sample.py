"""sample.py on a tiny character-level checkpoint: greedy output against a cache-free greedy decode, a vanishing
temperature gives the greedy output, and unreadable prompt files stop with one line naming the file."""
import torch
from conftest import run_script
from test_chat import save

from model import GPT, GPTConfig
from nanogpt.tokenizer import Tokenizer

CHARS = "\n !:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEC = {"kind": "char", "chars": CHARS}


def tiny_run(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_embd=32, n_head=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: no near-ties between two greedy decodes
    return save(tmp_path, "run", model, SPEC), model.eval()


def samples(out_dir, *args):
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--num_samples=1",
                        "--max_new_tokens=26", *args, check=False)
    return result, result.stdout.split("\n---------------\n")[0]


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([ids]))[:, -1])
        ids = ids + [int(logits.argmax())]
    return ids


def test_greedy_and_a_vanishing_temperature_both_give_the_cache_free_greedy_text(tmp_path):
    out_dir, model = tiny_run(tmp_path)
    tok = Tokenizer(SPEC)
    want = tok.decode(greedy_without_cache(model, tok.encode("ROMEO:"), 26))  # up to block_size
    for temperature in ("0", "1e-50", "5e-324"):
        result, text = samples(out_dir, "--start=ROMEO:", f"--temperature={temperature}")
        assert result.returncode == 0, result.stderr
        assert text == want, temperature


def test_a_prompt_file_that_is_missing_or_not_utf8_is_one_line(tmp_path):
    out_dir, _ = tiny_run(tmp_path)
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"ROMEO:\n\xff\xfe")
    for path, needle in ((bad, "not valid UTF-8"), (tmp_path / "missing.txt", "no such file")):
        result, _ = samples(out_dir, f"--start=FILE:{path}")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], result.stderr
