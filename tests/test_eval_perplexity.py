"""Perplexity beside bits per byte (nanogpt/tasks/bpb.py): token, byte and word perplexity of a uniform model by
hand, words counted as lm-evaluation-harness counts them (per document, its whitespace quirks included), and a
dataset folder's train split scored with the same rolling windows."""
import math
import os

import pytest
import torch
from test_eval_tasks import GPT2, Bigram, char_tokenizer

from nanogpt.scoring import Scorer
from nanogpt.tasks import bpb
from nanogpt.tasks.common import Settings
from nanogpt.tokenizer import Tokenizer


def test_perplexities_of_a_uniform_model_by_hand(tmp_path):
    chars = "abcé ö\n"
    text = "aé bö\nca " * 7  # the first character is context only (no EOT in a char vocabulary)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    scorer = Scorer(Bigram(torch.zeros(len(chars), len(chars)), block_size=10), char_tokenizer(chars), batch_size=3)
    m = bpb.TASK.run(scorer, Settings(text_file=str(tmp_path / "t.txt")))["metrics"]
    scored = text[1:]  # "é bö\nca aé bö..." : split on whitespace runs, a trailing one leaves an empty word
    words = len(scored.split()) + 1
    nll = len(scored) * math.log(len(chars))  # ln V nats a token
    assert (m["tokens"], m["bytes"], m["words"]) == (len(scored), len(scored.encode()), words)
    assert m["token_perplexity"] == pytest.approx(len(chars))
    assert m["byte_perplexity"] == pytest.approx(math.exp(nll / len(scored.encode())))
    assert m["byte_perplexity"] == pytest.approx(2 ** m["bits_per_byte"])
    assert m["word_perplexity"] == pytest.approx(math.exp(nll / words))


def test_words_are_counted_per_document_as_the_harness_counts_them():
    ids = GPT2.encode("hello world") + [GPT2.eot] + GPT2.encode(" a  b ") + [GPT2.eot]
    assert bpb.count_words(GPT2, ids) == 2 + 4  # re.split(r"\s+", " a  b ") == ['', 'a', 'b', '']
    assert bpb.count_words(GPT2, [GPT2.eot, GPT2.eot]) == 0


def test_a_dataset_folder_train_split_in_the_same_windows(data_root):
    folder = os.path.join(data_root, "shakespeare_char")
    tok = Tokenizer.for_dataset(folder)
    scorer = Scorer(Bigram(torch.zeros(tok.vocab_size, tok.vocab_size), block_size=16), tok, batch_size=4)
    train = bpb.TASK.run(scorer, Settings(text_file=folder, text_split="train", limit=3))
    val = bpb.TASK.run(scorer, Settings(text_file=folder, limit=3))
    assert train["metrics"]["tokens"] == val["metrics"]["tokens"] == 3 * 16 - 1  # windows of 16, the first token
    assert train["metrics"]["token_perplexity"] == pytest.approx(tok.vocab_size)  # context only
    assert train["metrics"]["words"] != val["metrics"]["words"]  # different text: the train shards were read
    with pytest.raises(FileNotFoundError, match="no 'test' shards"):
        bpb.TASK.run(scorer, Settings(text_file=folder, text_split="test", limit=3))
