"""Bits per byte and perplexity of a text, the numbers that compare across tokenizers: on any text file, or on a
dataset folder's val shards (val_*.bin, written with this checkpoint's tokenizer).

Every token is predicted once, in lm-evaluation-harness's rolling windows (loglikelihood_rolling): the first window
after EOT, each later one with as much of the preceding text as fits in block_size. Bits per byte = the summed
negative log-likelihood (nats) / ln 2 / the UTF-8 bytes of the predicted tokens; token perplexity = exp(mean
negative log-likelihood per token). Special tokens (EOT between a shard's documents) are not scored: they are no
bytes of text. --limit counts windows. As lm-evaluation-harness's wikitext also reports them: byte_perplexity =
exp(nll / bytes) = 2^bits_per_byte, and word_perplexity = exp(nll / words), words counted as the harness counts
them, len(re.split(r"\\s+", document)), over the documents of the scored text (a text file is one document; a
shard's documents end at EOT). A dataset folder's split is --text_split (val, or train).
"""
import math
import os
import re
import time

import numpy as np
import torch

from nanogpt.files import read_text
from nanogpt.scoring import rolling_windows
from nanogpt.shards import read_rows_info, read_shard, shard_paths
from nanogpt.tasks.common import task_result
from nanogpt.tokenizer import dataset_spec, spec_extends


def token_bytes(tok):
    """UTF-8 bytes of each token id's text; 0 for special tokens."""
    if tok.spec["kind"] == "char":
        return torch.tensor([len(ch.encode("utf-8")) for ch in tok.spec["chars"]])
    special = {tok.eot, *tok.special.values()}
    return torch.tensor([0 if i in special else len(tok.enc.decode_single_token_bytes(i))
                         for i in range(tok.vocab_size)])


def count_words(tok, ids):
    """Words of the text of token ids as lm-evaluation-harness counts them, per document (split at special
    tokens): len(re.split(r"\\s+", document)), empty documents left out."""
    special = {tok.eot, *tok.special.values()}
    documents, current = [], []
    for i in ids:
        if i in special:
            documents.append(current)
            current = []
        else:
            current.append(i)
    return sum(len(re.split(r"\s+", tok.decode(d))) for d in documents + [current] if d)


def read_tokens(path, scorer, split="val"):
    """(token ids, note): a text file encoded with the checkpoint's tokenizer, or a dataset folder's split's
    shards."""
    if not path:
        raise ValueError("bpb needs text_file: a text file, or a dataset folder holding val_*.bin shards")
    if not os.path.isdir(path):
        text = read_text(path)
        ids = scorer.encode(text)
        if not ids:
            raise ValueError(f"{path} holds no text to score: an empty file, or none of it in the vocabulary")
        kept = len(scorer.tok.decode(ids))
        return ids, f"{len(text) - kept} characters outside the vocabulary dropped" if kept < len(text) else ""
    if read_rows_info(path) is not None:
        raise ValueError(f"{path} holds post-training rows (rows.json), not a token stream")
    spec = dataset_spec(path)
    if not spec_extends(scorer.tok.spec, spec):
        raise ValueError(f"{path} was written with tokenizer {spec}, this checkpoint reads {scorer.tok.spec}")
    return np.concatenate([read_shard(p) for p in shard_paths(path, split)]), ""


class BitsPerByte:
    name = "bpb"

    def run(self, scorer, settings):
        start = time.time()
        tokens, note = read_tokens(settings.text_file, scorer, settings.text_split)
        if settings.limit:  # the first window predicts block_size tokens, and so does each next one
            tokens = tokens[:settings.limit * scorer.block_size]
        windows = rolling_windows([int(t) for t in tokens], scorer.block_size, scorer.tok.eot)[:settings.limit or None]
        sizes = token_bytes(scorer.tok)
        records = []
        for i, ((_, predicted), logprobs) in enumerate(zip(windows, scorer.loglikelihoods(windows, desc="bpb"))):
            n_bytes = sizes[torch.tensor(predicted)]
            records.append({"id": i, "tokens": int((n_bytes > 0).sum()), "bytes": int(n_bytes.sum()),
                            "nll": float(-logprobs[n_bytes > 0].sum())})
        nll, n_bytes, n_tokens = (sum(r[k] for r in records) for k in ("nll", "bytes", "tokens"))
        if not n_bytes:
            raise ValueError(f"{settings.text_file} holds no text to score: an empty file or shards")
        result = task_result(self.name, 0, records, (), start, [note])
        n_words = count_words(scorer.tok, [t for _, predicted in windows for t in predicted])
        result["metrics"] = {"bits_per_byte": nll / math.log(2) / n_bytes, "token_perplexity": math.exp(nll / n_tokens),
                             "byte_perplexity": math.exp(nll / n_bytes), "word_perplexity": math.exp(nll / n_words),
                             "bytes": n_bytes, "tokens": n_tokens, "words": n_words}
        result["stderr"] = dict.fromkeys(result["metrics"])
        return result


TASK = BitsPerByte()
