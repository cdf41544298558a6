"""PII redaction: e-mail addresses, IP addresses (v4 and v6), credit-card numbers (Luhn-checked) and phone numbers
are replaced by placeholders; everything else is left exactly as it was.

    text, counts = redact(text)        # counts: {"email": 1, "phone": 0, ...}

The kinds run in KINDS' order so a longer, more specific match is taken first (a card number is not read as a phone
number, an IP address not as digits). A candidate is replaced only when it passes its check: an IPv4 octet is at
most 255, a card number has 13-19 digits and a valid Luhn checksum, a phone number has 10-15 digits and is either
international (+country code) or North American with one separator throughout (so a plain number, a year range, a
sum such as 1500-135-141 or a price stays). Precision first: a phone number in another local format is missed.
"""
import ipaddress
import re

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>", "phone": "<PHONE>"}

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# card numbers as printed: one run of digits, groups of 4 (the last 1-7), or American Express's 4-6-5
CARD = re.compile(r"(?<![\d.,+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})"
                  r"(?![\d-]|[.,]\d)")
# phone numbers: international (+country code, then groups) or North American ((555) 123-4567, 555-123-4567), each
# with one separator throughout (so "+4915112345678 12 tickets" keeps its 12); a bare run of digits or arithmetic
# such as 1500-135-141 is not a phone number
PHONE = re.compile(r"(?<![\w+])\+1[ .-]?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]?\d{4}(?![\w-])"  # +1: always 3-3-4
                   r"|(?<![\w+])\+[2-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?"
                   r"(?P<sep>[ .-]?)\d{2,5}(?:(?P=sep)\d{2,5}){0,4}(?![\w-])"
                   r"|(?<![\w+])(?:\(\d{3}\) ?|\d{3}(?P<na>[ .-]))\d{3}(?(na)(?P=na)|[ .-])\d{4}(?![\w-]|[.,]\d)")


def luhn_valid(digits):
    """The Luhn checksum of a digit string (ISO/IEC 7812): every second digit from the right doubled."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_ipv4(s):
    return all(int(part) <= 255 for part in s.split("."))


def is_ipv6(s):
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return any(c.isdigit() for c in s)  # C++'s a::b parses as an address: one without a digit is not taken


def is_card(s):
    digits = re.sub(r"[ -]", "", s)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def is_phone(s):
    return 10 <= sum(c.isdigit() for c in s) <= 15


# cheap scans that rule a kind out for most texts: the kind's pattern runs only where they find something
DOTTED_QUAD = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
TEN_DIGITS = re.compile(r"\d(?:[ .()+-]{0,2}\d){9}")  # a card or phone number has at least 10 digits

# kind -> (pattern, check of a match, a cheap test that the text can hold one at all)
KINDS = {
    "email": (EMAIL, lambda s: True, lambda t: "@" in t),
    "ip": (IPV4, is_ipv4, DOTTED_QUAD.search),
    "ipv6": (IPV6, is_ipv6, lambda t: "::" in t or t.count(":") >= 3),
    "credit_card": (CARD, is_card, TEN_DIGITS.search),
    "phone": (PHONE, is_phone, TEN_DIGITS.search),
}


def substitute(pattern, check, text, placeholder):
    """(text with each match that passes check replaced, how many): pattern.sub, except that a rejected match is
    searched again from its second character, so a number just before a card or phone number (1500 4111 1111 1111
    1111) cannot hide it."""
    out, count, pos = [], 0, 0
    m = pattern.search(text)
    while m:
        if check(m.group()):
            out += [text[pos:m.start()], placeholder]
            count, pos = count + 1, m.end()
            m = pattern.search(text, pos)
        else:
            m = pattern.search(text, m.start() + 1)
    return "".join(out) + text[pos:], count


def redact(text, kinds=tuple(KINDS)):
    """(text with each found PII replaced by its placeholder, {kind: number replaced}); ipv6 counts as 'ip'."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    if not any(c.isdigit() for c in text) and "@" not in text and "::" not in text:
        return text, counts  # most text: nothing any pattern could match
    for kind in kinds:
        pattern, check, may_hold = KINDS[kind]
        if not may_hold(text):
            continue
        name = "ip" if kind == "ipv6" else kind
        text, found = substitute(pattern, check, text, PLACEHOLDERS[name])
        counts[name] += found
    return text, counts
