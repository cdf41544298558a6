"""The chat format: a conversation as token ids and a loss mask, for fine-tuning, preference pairs and chat.py.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": "..."} (a system message
only first). It is rendered as

    <|endoftext|> <|user_start|> content <|user_end|> <|assistant_start|> content <|assistant_end|> ...

<|endoftext|> (50256) opens it, as it opens every document in pretraining, so a packed row of conversations reads to
a base model like its pretraining stream. Each turn is its role's start token, the content encoded as plain text
(a message that contains "<|user_end|>" gets the characters, not the marker) and its role's end token; the markers
are the special tokens 50257..50262 of tokenizer.chat_spec(). The loss mask is 1 exactly on the assistant contents
and their <|assistant_end|> (what the model must learn to say, and when to stop), 0 everywhere else. A prompt for
generation is the conversation so far plus <|assistant_start|>. The character-level tokenizer has no chat format.
"""
from nanogpt.tokenizer import CHAT_TOKENS

ROLES = ("system", "user", "assistant")


def chat_tokens(tokenizer):
    """{'system': (start id, end id), 'user': ..., 'assistant': ...}; a ValueError for a tokenizer without them."""
    if tokenizer.spec["kind"] == "char":
        raise ValueError("the character-level tokenizer has no chat format (no ids for turn markers): post-train a "
                         "GPT-2 BPE model")
    if not set(CHAT_TOKENS) <= tokenizer.special.keys():
        raise ValueError(f"its {tokenizer.describe()} tokenizer has no chat tokens (a base model's)")
    return {role: (tokenizer.special[f"<|{role}_start|>"], tokenizer.special[f"<|{role}_end|>"]) for role in ROLES}


def check_messages(messages):
    """A ValueError saying what is wrong unless messages is a list of {role, content} with a system message only
    first."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            got = repr(message)[:200]
            raise ValueError(f"message {i} must be an object with exactly the keys role and content, got {got}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {message['role']!r}")
        if message["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(message['content']).__name__}")


def render(tokenizer, messages):
    """(ids, mask) of a conversation: the one rendering of the format; mask 1 on assistant contents and their end."""
    check_messages(messages)
    tokens = chat_tokens(tokenizer)
    ids, mask = [tokenizer.eot], [0]
    for message in messages:
        start, end = tokens[message["role"]]
        content = tokenizer.encode_ordinary(message["content"])
        trained = int(message["role"] == "assistant")
        ids += [start, *content, end]
        mask += [0] + [trained] * (len(content) + 1)
    return ids, mask


def render_prompt(tokenizer, messages):
    """Ids that ask for the next assistant reply: the conversation so far (ending with a user turn) and
    <|assistant_start|>."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    ids, _ = render(tokenizer, messages)
    return ids + [chat_tokens(tokenizer)["assistant"][0]]


def render_reply(tokenizer, prompt, reply):
    """(ids, mask) of prompt + one assistant reply with the mask on the reply and its end only (a preference pair's
    side: earlier assistant turns in the prompt are context, not the response being compared)."""
    prompt_ids = render_prompt(tokenizer, prompt)
    ids, _ = render(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
