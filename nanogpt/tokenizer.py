"""The tokenizers a checkpoint or a dataset can name: GPT-2 BPE (tiktoken), optionally with special tokens, or a
character vocabulary.

A tokenizer is described by its `spec`, a small dict: {"kind": "gpt2"}, {"kind": "gpt2", "special": {name: id}},
{"kind": "char", "chars": "..."}, or for a model imported from Hugging Face with another vocabulary
{"kind": "hf", "name": ..., "json": <its tokenizer.json>, "eot": id} (run by hf.HFTokenizer, `tokenizers`
needed). A prepare script records the spec of the tokenizer that wrote a dataset's shards in the dataset folder
(tokenizer.json), and every checkpoint stores the spec it was trained with, so sampling and evaluation never need
the dataset folder and a run never trains on ids of a tokenizer it does not know.

Special tokens (the chat format's turn markers, nanogpt/chat_format.py) take the ids right after GPT-2's 50,257, in
order: {"<|system_start|>": 50257, ...}. `encode` turns their text into their ids (as it does <|endoftext|>), so a
`sample.py --start` can hold them; `encode_ordinary` reads them as plain text, which is how chat messages are
encoded (a message cannot forge a turn marker). The model's embedding and head have `model_vocab_size` rows: GPT-2
padded to a multiple of 64 (50,304: faster matmuls on GPUs, room for the special tokens without resizing the model),
a character vocabulary as it is. Ids past the tokenizer's vocabulary (the padding rows) decode to U+FFFD.
"""
import itertools
import os
import pickle

from nanogpt.files import FileFormatError, read_json, write_json

SPEC_FILE = "tokenizer.json"
GPT2_VOCAB_SIZE = 50257
VOCAB_MULTIPLE = 64  # GPT-2 models get 50,304 embedding rows (nanoGPT's padding)
CHAT_TOKENS = ("<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
               "<|assistant_end|>")


def chat_spec():
    """The GPT-2 spec with the chat format's turn markers at 50257..50262."""
    return {"kind": "gpt2", "special": {name: GPT2_VOCAB_SIZE + i for i, name in enumerate(CHAT_TOKENS)}}


def gpt2_encoding(special):
    """tiktoken's GPT-2 encoding, extended by the special tokens {name: id} (the way tiktoken's README extends one)."""
    import tiktoken
    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its vocabulary once, then reads its cache
        raise ValueError(f"the GPT-2 tokenizer's files could not be loaded ({type(e).__name__}); offline, "
                         "point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached GPT-2 files") from e
    if not special:
        return base
    want = list(range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(special)))
    if sorted(special.values()) != want or any(name in base._special_tokens for name in special):
        raise ValueError(f"special tokens {special} must take the ids {want[0]}..{want[-1]} once each, under new names")
    return tiktoken.Encoding(name="gpt2_special", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens={**base._special_tokens, **special})


class Tokenizer:
    def __init__(self, spec):
        self.spec = spec
        self.special = dict(spec.get("special", {}))  # name -> id of the special tokens beyond GPT-2's own
        if spec["kind"] == "gpt2":
            self.enc = gpt2_encoding(self.special)
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif spec["kind"] == "char":
            if self.special:
                raise ValueError("a character vocabulary has no special tokens")
            self.stoi = {ch: i for i, ch in enumerate(spec["chars"])}
            self.vocab_size, self.eot = len(spec["chars"]), None
        elif spec["kind"] == "hf":  # a Hugging Face `tokenizers` vocabulary (nanogpt/hf.py)
            from nanogpt.hf import HFTokenizer
            self.enc = HFTokenizer(spec)
            self.vocab_size, self.eot = self.enc.vocab_size, self.enc.eot
        else:
            raise ValueError(f"unknown tokenizer kind {spec['kind']!r} (expected 'gpt2', 'char' or 'hf')")

    @classmethod
    def for_dataset(cls, data_dir):
        return cls(dataset_spec(data_dir))

    def describe(self):
        if self.spec["kind"] == "char":
            return f"character-level ({self.vocab_size} characters)"
        if self.spec["kind"] == "hf":
            return f"Hugging Face {self.spec['name']} ({self.vocab_size:,} tokens)"
        return "GPT-2 BPE" + (f" + {len(self.special)} special tokens" if self.special else "")

    def encode(self, text):
        """Token ids of text; the text of a special token (<|endoftext|>, the chat markers) becomes its id."""
        if self.spec["kind"] == "gpt2":
            return self.enc.encode(text, allowed_special="all")
        if self.spec["kind"] == "hf":
            return self.enc.encode(text)
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def encode_ordinary(self, text):
        """Token ids of text, special tokens' text included as plain text (for message contents)."""
        return self.enc.encode_ordinary(text) if self.spec["kind"] in ("gpt2", "hf") else self.encode(text)

    def decode(self, ids):
        """The text of ids; an id past the vocabulary (a padding row of the model) becomes U+FFFD."""
        ids = list(ids)
        if self.spec["kind"] == "char":
            return "".join(self.spec["chars"][i] if i < self.vocab_size else "\ufffd" for i in ids)
        if all(0 <= i < self.vocab_size for i in ids):
            return self.enc.decode(ids)
        runs = itertools.groupby(ids, key=lambda i: 0 <= i < self.vocab_size)
        return "".join(self.enc.decode(list(run)) if known else "\ufffd" * len(list(run)) for known, run in runs)


def model_vocab_size(tokenizer):
    """Embedding and head rows for a model of this tokenizer: GPT-2's ids (and special tokens) padded up to a
    multiple of 64, so the chat tokens fit a base model unchanged; a character vocabulary as it is (so the
    checkpoints of character models, which never post-train, keep their shapes)."""
    if tokenizer.spec["kind"] == "char":
        return tokenizer.vocab_size
    return -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def spec_extends(spec, base):
    """True when data of tokenizer `spec` can train a model of tokenizer `base`: the same, or `base` plus special
    tokens (a base GPT-2 model starting chat fine-tuning)."""
    if spec == base:
        return True
    if spec["kind"] != "gpt2" or base["kind"] != "gpt2":
        return False
    new, old = spec.get("special", {}), base.get("special", {})
    return all(new.get(name) == i for name, i in old.items())


def dataset_tokenizer(dirs):
    """The tokenizer of the run's datasets: the one with the most special tokens, which every other dataset's must
    equal or lack only special tokens of (chat data mixes with plain GPT-2 text); two tokenizers are refused."""
    tokenizers = [Tokenizer.for_dataset(d) for d in dirs]
    widest = max(range(len(dirs)), key=lambda i: len(tokenizers[i].special))
    for d, tok in zip(dirs, tokenizers):
        if not spec_extends(tokenizers[widest].spec, tok.spec):
            raise ValueError(f"{dirs[widest]} was written with the {tokenizers[widest].describe()} tokenizer but {d} "
                             f"with {tok.describe()}: a mixture needs datasets of one tokenizer")
    return tokenizers[widest]


def save_dataset_spec(data_dir, spec):
    """Record which tokenizer wrote data_dir's shards (temp file + rename)."""
    write_json(os.path.join(data_dir, SPEC_FILE), spec, indent=None)


class _PlainDataOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and numbers only: a meta.pkl that names any class or function
    (the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may only hold plain data")


def dataset_spec(data_dir):
    """The spec recorded in data_dir (tokenizer.json, or an older nanoGPT-style meta.pkl read as plain data only);
    a ValueError when the folder does not say which tokenizer wrote it (a FileFormatError naming the file when its
    tokenizer.json is not a spec)."""
    path = os.path.join(data_dir, SPEC_FILE)
    if os.path.exists(path):
        spec = read_json(path)
        if not isinstance(spec, dict) or spec.get("kind") not in ("gpt2", "char", "hf"):
            raise FileFormatError(f"{path}: expected a tokenizer spec such as {{\"kind\": \"gpt2\"}}, got "
                                  f"{str(spec)[:60]}: rerun the dataset's prepare.py")
        return spec
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
                     f"`python data/{name}/prepare.py`, or write {{\"kind\": \"gpt2\"}} to {path} if they are "
                     "GPT-2 BPE")
