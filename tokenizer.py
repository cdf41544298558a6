"""The tokenizers a checkpoint or a dataset can name: GPT-2 BPE (tiktoken) or a character vocabulary.

A tokenizer is described by its `spec`, a small dict: {"kind": "gpt2"} or {"kind": "char", "chars": "..."}. A
prepare script records the spec of the tokenizer that wrote a dataset's shards in the dataset folder
(tokenizer.json), and every checkpoint stores the spec it was trained with, so sampling and evaluation never need
the dataset folder and a run never trains on ids of a tokenizer it does not know.
"""
import json
import os
import pickle

SPEC_FILE = "tokenizer.json"
GPT2_VOCAB_SIZE = 50257


class Tokenizer:
    def __init__(self, spec):
        self.spec = spec
        if spec["kind"] == "gpt2":
            import tiktoken
            try:
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # tiktoken downloads its vocabulary once, then reads its cache
                raise ValueError(f"the GPT-2 tokenizer's files could not be loaded ({type(e).__name__}); offline, "
                                 "point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached GPT-2 files") from e
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif spec["kind"] == "char":
            self.stoi = {ch: i for i, ch in enumerate(spec["chars"])}
            self.vocab_size, self.eot = len(spec["chars"]), None
        else:
            raise ValueError(f"unknown tokenizer kind {spec['kind']!r} (expected 'gpt2' or 'char')")

    @classmethod
    def for_dataset(cls, data_dir):
        return cls(dataset_spec(data_dir))

    def describe(self):
        return "GPT-2 BPE" if self.spec["kind"] == "gpt2" else f"character-level ({self.vocab_size} characters)"

    def encode(self, text):
        if self.spec["kind"] == "gpt2":
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        if self.spec["kind"] == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.spec["chars"][i] for i in ids)


def save_dataset_spec(data_dir, spec):
    """Record which tokenizer wrote data_dir's shards (temp file + rename)."""
    path = os.path.join(data_dir, SPEC_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f)
    os.replace(path + ".tmp", path)


class _PlainDataOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and numbers only: a meta.pkl that names any class or function
    (the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may only hold plain data")


def dataset_spec(data_dir):
    """The spec recorded in data_dir (tokenizer.json, or an older nanoGPT-style meta.pkl read as plain data only);
    a ValueError when the folder does not say which tokenizer wrote it."""
    path = os.path.join(data_dir, SPEC_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    legacy = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(legacy):
        try:
            with open(legacy, "rb") as f:
                meta = _PlainDataOnly(f).load()
            return {"kind": "char", "chars": "".join(meta["itos"][i] for i in range(meta["vocab_size"]))}
        except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
            raise ValueError(f"{legacy} is not a character vocabulary this repo can read ({e}); "
                             f"rerun the dataset's prepare.py") from e
    name = os.path.basename(os.path.normpath(data_dir))
    raise ValueError(f"{data_dir} does not say which tokenizer wrote its shards (no {SPEC_FILE}): rerun "
                     f"`python data/{name}/prepare.py`, or write {{\"kind\": \"gpt2\"}} to {path} if they are GPT-2 BPE")
