"""The text pipeline's parts against hand-labelled cases and naive references: quality rules (nanogpt/text_filters.py),
PII redaction (nanogpt/pii.py), exact and MinHash near-duplicate detection (nanogpt/dedup.py), language ID."""
import json
import os
import random
from collections import Counter

import numpy as np
import pytest

from conftest import SHARED
from nanogpt import dedup, pii, text_filters

GSM8K = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")

# a document that passes every rule: natural prose, several lines, each ending in punctuation
GOOD = ("The history of the city is long and full of change. It was founded by traders who came from the coast, "
        "and over time it grew into a busy market town.\n"
        "Many of the old buildings still stand today, with narrow streets that wind between them.\n"
        "Visitors often say that the best time to come is in the spring, when the gardens are in bloom and the "
        "weather is mild.\n"
        "Local people have kept many traditions alive, and there is a festival every year that draws large crowds "
        "to the main square.")
PROSE = [w.strip(".,") for w in GOOD.split()]


def lines_of(*lines):
    return "\n".join(lines)


# hand-labelled: (document, rule overrides, the rule that must remove it first)
LABELLED = [
    ("Too short to be a document.", {}, "min_chars"),
    (GOOD, {"max_chars": 300}, "max_chars"),
    (" ".join(["wonderful"] * 30) + ".", {}, "min_words"),
    (GOOD, {"max_words": 40}, "max_words"),
    (" ".join(["it is a to of an or be"] * 12) + ".", {}, "min_mean_word_length"),
    (" ".join(["internationalisation characteristically the and"] * 15) + ".", {}, "max_mean_word_length"),
    (GOOD + " " + " ".join(f"#tag{i}" for i in range(15)) + ".", {}, "max_symbol_word_ratio"),
    (lines_of(*(f"- {s.strip()}." for s in GOOD.replace("\n", " ").split(". ") if s)), {}, "max_bullet_lines"),
    (GOOD.replace(".\n", "...\n"), {}, "max_ellipsis_lines"),
    (GOOD + " " + " ".join(str(1000 + 7 * i) for i in range(30)) + ".", {}, "min_alpha_words"),
    (lines_of(*["Cats sleep most hours during sunny afternoons, dreaming quietly beside warm windows.",
                "Dogs chase balls across green parks while children laugh loudly nearby.",
                "Birds sing early, before people wake, filling gardens full sweet music.",
                "Rivers carry cold water down from distant mountains toward open seas.",
                "Farmers plant wheat each spring, hoping for gentle rain plus steady sunshine."]),
     {}, "min_stop_words"),
    (lines_of(*(" ".join(PROSE[i:i + 8]) for i in range(0, len(PROSE), 8))), {}, "min_punctuated_lines"),
    (lines_of(*(" ".join(PROSE[i:i + 3]) + "." for i in range(0, len(PROSE), 3))), {}, "max_short_lines"),
    (lines_of(*GOOD.split("\n")[:2] * 3), {}, "max_duplicate_lines"),
    (lines_of(*[f"Line number {i} of the list has the usual kind of words in it." for i in range(12)],
              GOOD.replace("\n", " "), GOOD.replace("\n", " ")), {}, "max_duplicate_line_chars"),
    (GOOD + " " + " ".join(f"common phrase w{i}" for i in range(40)) + ".", {}, "max_top_2gram"),
    (GOOD + " " + " ".join(f"a common phrase w{i}" for i in range(25)) + ".", {"max_top_2gram": None},
     "max_top_3gram"),
    (GOOD + " " + " ".join(f"and a common phrase w{i}" for i in range(20)) + ".",
     {"max_top_2gram": None, "max_top_3gram": None}, "max_top_4gram"),
    (GOOD + " " + " ".join(["the quick brown fox jumps over the lazy dog again."] * 2), {}, "max_dup_5gram"),
    (GOOD + " " + GOOD[:260], {"max_dup_5gram": None}, "max_dup_10gram"),
    (GOOD + " Lorem ipsum dolor sit amet.", {}, "no_lorem_ipsum"),
    (GOOD + " if (x) { return y; }", {"no_curly_bracket": True}, "no_curly_bracket"),
]


def test_good_document_passes_every_rule():
    assert text_filters.first_failed_rule(GOOD) is None


@pytest.mark.parametrize("text,overrides,rule", LABELLED, ids=[case[2] for case in LABELLED])
def test_each_rule_removes_its_hand_labelled_document(text, overrides, rule):
    rules = text_filters.check_rules(overrides)
    assert text_filters.first_failed_rule(text, rules) == rule
    assert text_filters.first_failed_rule(text, {**rules, rule: None}) != rule  # switched off, it removes nothing


def test_every_rule_has_a_labelled_case_and_unknown_rules_are_refused():
    assert {case[2] for case in LABELLED} == set(text_filters.RULES)
    with pytest.raises(text_filters.RuleError, match="unknown quality rule 'min_wrods'"):
        text_filters.check_rules({"min_wrods": 3})


def naive_top_ngram(words, n):
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    top = max(counts.values())
    if top < 2:
        return 0.0
    return top * max(sum(map(len, g)) for g, c in counts.items() if c == top) / sum(map(len, words))


def naive_duplicate_ngram(words, n):
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = set()
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered.update(range(i, i + n))
    return sum(len(words[i]) for i in covered) / sum(map(len, words))


def test_ngram_rules_match_a_naive_count(seed):
    rng = random.Random(seed)
    vocab = ["a", "bb", "ccc", "dddd", "the", "of", "x" * 9]
    for _ in range(200):
        length = rng.choice([rng.randint(0, 20), rng.randint(140, 400)])  # both code paths (NUMPY_FROM_WORDS)
        words = [rng.choice(vocab[:rng.randint(1, len(vocab))]) for _ in range(length)]
        doc = text_filters.Doc(" ".join(words))
        for n in (2, 3, 4):
            assert text_filters.top_ngram_fraction(doc, n) == pytest.approx(naive_top_ngram(words, n), abs=1e-12)
        for n in (5, 10):
            assert text_filters.duplicate_ngram_fraction(doc, n) == pytest.approx(naive_duplicate_ngram(words, n),
                                                                                  abs=1e-12)

# ----------------------------------------------------------------------------------------------------------- PII


PLANTED = {  # kind -> values that must be replaced
    "email": ["jane.doe@example.com", "j_smith+news@mail.example.co.uk", "X9@sub-domain.org"],
    "phone": ["(555) 123-4567", "555-123-4567", "555.123.4567", "+1 555 123 4567", "+44 20 7946 0958",
              "+4915112345678"],
    "ip": ["192.168.1.20", "8.8.8.8", "255.255.255.0", "2001:db8::8a2e:370:7334", "fe80::1"],
    "credit_card": ["4111 1111 1111 1111", "4539-5787-6362-1486", "5500005555555559", "3782 822463 10005"],
}
NOT_PII = ["1990-2000", "$1,200,000", "3.14159", "12:30:45", "version 1.2.3", "999.1.1.1", "4111 1111 1111 1112",
           "ISBN 978-0-306-40615-7", "order 123456789", "call me at noon", "1500-135-141", "a::b", "std::vector",
           "2024-12-04",
           "user at example dot com", "10.0.0.256", "+7 apples"]


def test_luhn_against_known_numbers():
    assert all(pii.luhn_valid(n) for n in ("4111111111111111", "79927398713", "5500005555555559"))
    assert not any(pii.luhn_valid(n) for n in ("4111111111111112", "79927398710", "1234567812345678"))


@pytest.mark.parametrize("kind", list(PLANTED))
def test_every_planted_pii_kind_is_replaced_and_nothing_else_changes(kind, seed):
    rng = random.Random(seed)
    rows = [json.loads(line) for _, line in zip(range(300), open(GSM8K))]
    for value in PLANTED[kind]:
        row = rng.choice(rows)
        words = row["question"].split(" ")
        at = rng.randrange(len(words) + 1)
        text = " ".join(words[:at] + [f"({value})" if rng.random() < 0.3 else value] + words[at:])
        expected = text.replace(value, pii.PLACEHOLDERS[kind])
        redacted, counts = pii.redact(text)
        assert redacted == expected, value
        assert counts[kind] == 1 and sum(counts.values()) == 1, (value, counts)


def test_text_without_pii_is_left_exactly_as_it_was():
    for value in NOT_PII:
        assert pii.redact(f"Here is {value}, as written.")[0] == f"Here is {value}, as written.", value
    changed = [row for row in map(json.loads, open(GSM8K))
               for text in (row["question"], row["answer"]) if pii.redact(text)[0] != text]
    assert changed == []  # 14,946 texts full of numbers, sums and prices: no false positive

# --------------------------------------------------------------------------------------------------------- dedup


def edit_words(words, fraction, rng):
    """words with about `fraction` of them replaced by new ones (a near-duplicate)."""
    out = list(words)
    for i in rng.sample(range(len(out)), max(1, int(fraction * len(out)))):
        out[i] = f"edit{rng.randrange(10**6)}"
    return out


def test_exact_key_ignores_case_spacing_and_punctuation():
    assert dedup.exact_key(dedup.normalise("Hello,  World!\n")) == dedup.exact_key(dedup.normalise("hello world"))
    assert dedup.exact_key(dedup.normalise("hello world")) != dedup.exact_key(dedup.normalise("hello there world"))


def test_normalise_matches_its_regex_definition(seed):
    import re
    import unicodedata

    def reference(text):  # NFKC, lower case, punctuation runs -> space, whitespace runs -> one space, stripped
        text = re.sub(r"[^\w\s]+", " ", unicodedata.normalize("NFKC", text).lower())
        return re.sub(r"\s+", " ", text).strip()
    rng = random.Random(seed)
    alphabet = [chr(i) for i in range(128)] + list("\u00e9\u00c0\u00df\ufb01\u2460\u3000\u00a0\u2003\u2014\u2026\u201c")
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert dedup.normalise(text) == reference(text), repr(text)


def test_minhash_estimates_jaccard(seed):
    rng = random.Random(seed)
    hasher = dedup.MinHasher(bands=16, rows=16, shingle=3, seed=seed)
    base = [f"w{rng.randrange(400)}" for _ in range(300)]
    for fraction in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        a, b = " ".join(base), " ".join(edit_words(base, fraction, rng))
        truth = dedup.jaccard(a, b, shingle=3)
        estimate = np.mean(hasher.signature(dedup.normalise(a)) == hasher.signature(dedup.normalise(b)))
        assert abs(estimate - truth) < 4 * np.sqrt(truth * (1 - truth) / 256) + 0.02, (fraction, truth, estimate)


def test_near_duplicate_precision_and_recall_on_planted_copies(seed):
    """gsm8k documents, then planted copies: near (Jaccard >= 0.9 by the exact reference) must be found, far
    (Jaccard <= 0.6) and the originals must not be."""
    rng = random.Random(seed)
    docs = [r["question"] + " " + r["answer"] for _, r in zip(range(400), map(json.loads, open(GSM8K)))]
    hasher, index = dedup.MinHasher(14, 8, 5, seed=1), dedup.NearDupIndex(14, 8, 0.8)
    labelled = [(f"orig{i}", d, False) for i, d in enumerate(docs)]
    near = far = 0
    while near < 60 or far < 60:
        i = rng.randrange(len(docs))
        copy = " ".join(edit_words(docs[i].split(), rng.choice([0.01, 0.02, 0.3, 0.4]), rng))
        j = dedup.jaccard(docs[i], copy)
        if j >= 0.9 and near < 60:
            labelled.append((f"near{near}", copy, True))
            near += 1
        elif j <= 0.6 and far < 60:
            labelled.append((f"far{far}", copy, False))
            far += 1
    found = {where for where, text, _ in labelled if index.add(where, hasher.signature(dedup.normalise(text)))}
    planted = {where for where, _, dup in labelled if dup}
    precision, recall = len(found & planted) / max(1, len(found)), len(found & planted) / len(planted)
    print(f"near-dup precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, sorted(found - planted)[:5])


def test_lsh_candidate_curve():
    assert dedup.candidate_probability(0.9, 14, 8) > 0.999
    assert dedup.candidate_probability(0.3, 14, 8) < 0.001

# ---------------------------------------------------------------------------------------------------- language ID


def test_language_id_on_udhr():
    pytest.importorskip("py3langid")
    from nanogpt.bpe import read_heldout
    from nanogpt.langid import load_identifier
    identify = load_identifier()
    folder = os.path.join(SHARED, "data", "udhr", "declaration")
    expected = {"eng": "en", "fra": "fr", "spa": "es", "rus": "ru", "cmn_hans": "zh", "arb": "ar", "hin": "hi",
                "jpn": "ja"}
    texts = read_heldout([os.path.join(folder, f"{code}.html") for code in expected])
    for tag, lang in expected.items():
        assert tag in texts, sorted(texts)[:20]
        got, confidence = identify(texts[tag][:2000])
        assert (got, confidence > 0.9) == (lang, True), (tag, got, confidence)
