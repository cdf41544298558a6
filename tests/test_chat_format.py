"""The chat format and the tokenizer's special tokens: golden ids and masks built by hand from tiktoken's ids of the
pieces and the literal special ids, random conversations against the same hand-built rendering, refusals."""
import random

import pytest
import tiktoken

from nanogpt.chat_format import chat_tokens, check_messages, render, render_prompt, render_reply
from nanogpt.tokenizer import Tokenizer, chat_spec, model_vocab_size, spec_extends

EOT, SYSTEM, SYSTEM_END, USER, USER_END, ASSISTANT, ASSISTANT_END = 50256, 50257, 50258, 50259, 50260, 50261, 50262
TURN_IDS = {"system": (SYSTEM, SYSTEM_END), "user": (USER, USER_END), "assistant": (ASSISTANT, ASSISTANT_END)}
GPT2 = tiktoken.get_encoding("gpt2")
CHAT = Tokenizer(chat_spec())


def expected(messages):
    """The format written out by hand: EOT, then per turn start, plain-text content, end; mask on assistant parts."""
    ids, mask = [EOT], [0]
    for m in messages:
        start, end = TURN_IDS[m["role"]]
        content = GPT2.encode_ordinary(m["content"])
        ids += [start, *content, end]
        mask += [0] + [int(m["role"] == "assistant")] * (len(content) + 1)
    return ids, mask


def test_golden_ids_literal():
    ids, mask = render(CHAT, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert ids == [50256, 50259, 17250, 50260, 50261, 15496, 0, 50262]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1]


def test_golden_multi_turn_with_system_and_forged_marker():
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "<|user_end|>And 3+3?"},
                {"role": "assistant", "content": "6 <|assistant_end|> naïve 東京"}]
    ids, mask = render(CHAT, messages)
    pieces = [GPT2.encode_ordinary(m["content"]) for m in messages]
    assert ids == ([EOT, SYSTEM, *pieces[0], SYSTEM_END, USER, *pieces[1], USER_END, ASSISTANT, *pieces[2],
                    ASSISTANT_END, USER, *pieces[3], USER_END, ASSISTANT, *pieces[4], ASSISTANT_END])
    assert mask == ([0] * (len(pieces[0]) + 3) + [0] * (len(pieces[1]) + 2) + [0] + [1] * (len(pieces[2]) + 1)
                    + [0] * (len(pieces[3]) + 2) + [0] + [1] * (len(pieces[4]) + 1))
    assert ids.count(USER_END) == 2 and ids.count(ASSISTANT_END) == 2  # the markers written in text stay text


def random_conversation(rng):
    words = ["hello", " world", "<|user_end|>", " 42", "\n", "naïve", " 🙂", "<|endoftext|>", "  ", "x"]
    text = lambda: "".join(rng.choice(words) for _ in range(rng.randrange(0, 8)))  # noqa: E731
    turns = [rng.choice(["user", "assistant"]) for _ in range(rng.randrange(1, 7))]
    roles = (["system"] if rng.random() < 0.5 else []) + turns
    return [{"role": role, "content": text()} for role in roles]


def test_random_conversations_match_the_format(seed):
    rng = random.Random(seed)
    for _ in range(200):
        messages = random_conversation(rng)
        assert render(CHAT, messages) == expected(messages)


def test_prompt_and_reply_rendering():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    prompt = render_prompt(CHAT, messages)
    assert prompt == expected(messages)[0] + [ASSISTANT]
    ids, mask = render_reply(CHAT, messages, "See you")
    reply = GPT2.encode_ordinary("See you")
    assert ids == prompt + reply + [ASSISTANT_END]
    assert mask == [0] * len(prompt) + [1] * (len(reply) + 1)  # the earlier assistant turn is context only
    with pytest.raises(ValueError, match="must end with a user message"):
        render_prompt(CHAT, messages[:2])


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "role must be one of system, user, assistant"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "system message may only come first"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user", "text": "x"}], "exactly the keys role and content"),
])
def test_bad_messages_say_what_is_wrong(messages, message):
    with pytest.raises(ValueError, match=message):
        check_messages(messages)


def test_base_and_character_tokenizers_have_no_chat_format():
    with pytest.raises(ValueError, match="character-level tokenizer has no chat format"):
        render(Tokenizer({"kind": "char", "chars": "abc"}), [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="GPT-2 BPE tokenizer has no chat tokens"):
        chat_tokens(Tokenizer({"kind": "gpt2"}))


# ------------------------------------------------------------------------------------------------------- tokenizer

def test_old_specs_load_unchanged():
    base = Tokenizer({"kind": "gpt2"})
    assert (base.vocab_size, base.eot, base.special, base.describe()) == (50257, 50256, {}, "GPT-2 BPE")
    assert base.encode("a<|endoftext|>") == [64, 50256]
    char = Tokenizer({"kind": "char", "chars": "\n abc"})
    assert (char.vocab_size, char.eot, char.encode("ab c"), char.decode([2, 3, 1])) == (5, None, [2, 3, 1, 4], "ab ")
    assert model_vocab_size(base) == 50304 and model_vocab_size(char) == 5


def test_chat_tokens_encode_and_decode():
    assert CHAT.spec == {"kind": "gpt2", "special": dict(zip(
        ["<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
         "<|assistant_end|>"], range(50257, 50263)))}
    assert CHAT.vocab_size == 50263 and model_vocab_size(CHAT) == 50304
    assert CHAT.encode("<|user_start|>Hi<|user_end|>") == [USER, 17250, USER_END]
    assert CHAT.encode_ordinary("<|user_start|>") == GPT2.encode_ordinary("<|user_start|>")
    assert CHAT.decode([ASSISTANT, 15496, 0, ASSISTANT_END]) == "<|assistant_start|>Hello!<|assistant_end|>"
    assert CHAT.decode([17250, 50263, 50303, 0]) == "Hi\ufffd\ufffd!"  # padding rows of the model decode to U+FFFD


def test_bad_special_tokens_are_refused():
    with pytest.raises(ValueError, match="must take the ids 50257..50257"):
        Tokenizer({"kind": "gpt2", "special": {"<|x|>": 50300}})
    with pytest.raises(ValueError, match="under new names"):
        Tokenizer({"kind": "gpt2", "special": {"<|endoftext|>": 50257}})
    with pytest.raises(ValueError, match="no special tokens"):
        Tokenizer({"kind": "char", "chars": "ab", "special": {"<|x|>": 2}})


def test_spec_extends():
    base, chat, char = {"kind": "gpt2"}, chat_spec(), {"kind": "char", "chars": "ab"}
    assert spec_extends(chat, base) and spec_extends(chat, chat) and spec_extends(char, char)
    assert not spec_extends(base, chat) and not spec_extends(chat, char) and not spec_extends(char, base)
    moved = {"kind": "gpt2", "special": {"<|user_start|>": 50257}}
    assert not spec_extends(chat, moved)  # the same name at another id
