"""The tokenizers a checkpoint can name: GPT-2 BPE (tiktoken) or a character vocabulary from a prepare script's meta.pkl.
A checkpoint stores the tokenizer's `spec`, so sampling and evaluation never need the dataset folder."""
import os
import pickle


class Tokenizer:
    def __init__(self, spec):
        self.spec = spec
        if spec["kind"] == "gpt2":
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
            self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token
        elif spec["kind"] == "char":
            self.stoi = {ch: i for i, ch in enumerate(spec["chars"])}
            self.vocab_size, self.eot = len(spec["chars"]), None
        else:
            raise ValueError(f"unknown tokenizer kind {spec['kind']!r} (expected 'gpt2' or 'char')")

    @classmethod
    def for_dataset(cls, data_dir):
        """The tokenizer of a prepared dataset: meta.pkl's characters if present, else GPT-2."""
        meta_path = os.path.join(data_dir, "meta.pkl")
        if os.path.exists(meta_path):
            with open(meta_path, "rb") as f:
                meta = pickle.load(f)
            return cls({"kind": "char", "chars": "".join(meta["itos"][i] for i in range(meta["vocab_size"]))})
        return cls({"kind": "gpt2"})

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
