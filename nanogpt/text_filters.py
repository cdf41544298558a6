"""Document quality rules in the style of Gopher (Rae et al. 2021, appendix A), C4 (Raffel et al. 2020) and FineWeb
(Penedo et al. 2024): each rule is one small function of a document's text and one threshold, each switchable.

    failed = first_failed_rule(text, RULES)   # None when the document passes every enabled rule

RULES maps a rule's name to its threshold; a data/text/prepare.py setting `--rules` overrides them (a threshold of
None switches the rule off). The rules run in RULES' order and the first that fails names the document's removal,
so the report counts each removed document once. Thresholds are the published ones where a paper gives one.
Words are whitespace-separated tokens (the papers' own definition), lines are split on newlines.
"""
import re

import numpy as np

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's stop-word list
BULLETS = ("\u2022", "*", "-", "\u2023", "\u25e6", "\u2043", "\u2219")
ELLIPSES = ("...", "\u2026")
HASH_BASE = np.uint64(1_000_003)  # odd, so it has an inverse mod 2^64
HASH_INVERSE = np.uint64(pow(1_000_003, -1, 2**64))
NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")  # a whitespace-separated word without a letter
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";", ")", "\u3002", "\uff01", "\uff1f")

# name -> threshold, in the order the rules run (cheap length checks first)
RULES = {
    "min_chars": 200,                 # length limits
    "max_chars": 1_000_000,
    "min_words": 50,                  # Gopher: 50 <= words <= 100,000
    "max_words": 100_000,
    "min_mean_word_length": 3.0,      # Gopher: mean word length in [3, 10] characters
    "max_mean_word_length": 10.0,
    "max_symbol_word_ratio": 0.1,     # Gopher: '#' and ellipses per word
    "max_bullet_lines": 0.9,          # Gopher: fraction of lines starting with a bullet
    "max_ellipsis_lines": 0.3,        # Gopher: fraction of lines ending in an ellipsis
    "min_alpha_words": 0.8,           # Gopher: fraction of words with an alphabetic character
    "min_stop_words": 2,              # Gopher: at least 2 of the 8 stop words
    "min_punctuated_lines": 0.12,     # FineWeb: fraction of lines ending in terminal punctuation (C4 keeps lines)
    "max_short_lines": 0.67,          # FineWeb: fraction of lines of at most 30 characters
    "max_duplicate_lines": 0.3,       # Gopher: fraction of lines that repeat an earlier line
    "max_duplicate_line_chars": 0.2,  # Gopher: their fraction of the characters
    "max_top_2gram": 0.20,            # Gopher: characters in the most frequent word 2-, 3-, 4-gram
    "max_top_3gram": 0.18,
    "max_top_4gram": 0.16,
    "max_dup_5gram": 0.15,            # Gopher: characters in word 5- and 10-grams that occur more than once
    "max_dup_10gram": 0.10,
    "no_lorem_ipsum": True,           # C4: placeholder text
    "no_curly_bracket": False,        # C4 drops any '{' (code); off by default, code is welcome here
}


LENGTH_RULES = ("min_chars", "max_chars", "min_words", "max_words")  # run first, before language identification


class RuleError(ValueError):
    pass


def check_rules(overrides):
    """RULES updated by {name: threshold or None}; an unknown name is a RuleError listing the known ones."""
    unknown = sorted(set(overrides) - set(RULES))
    if unknown:
        raise RuleError(f"unknown quality rule {unknown[0]!r}: the rules are {', '.join(RULES)}")
    return {**RULES, **overrides}


class Doc:
    """The parts of a document the rules look at, computed once and only when a rule needs them."""

    def __init__(self, text):
        self.text = text
        self._words = self._lines = self._arrays = None

    @property
    def words(self):
        if self._words is None:
            self._words = self.text.split()
        return self._words

    def word_arrays(self):
        """Arrays for the n-gram rules: an id per word (its 64-bit str hash: equal words, equal ids; two words share
        one with probability 2^-64), each word's length, prefix sums of ids[i] P^i and of lengths, and P^-i (mod
        2^64), so any n-gram's hash and length are two array operations."""
        if self._arrays is None:
            n = len(self.words)
            ids = np.fromiter(map(hash, self.words), np.int64, n).view(np.uint64)  # equal words, equal ids
            lengths = np.fromiter(map(len, self.words), np.int64, n)
            powers = np.concatenate([[np.uint64(1)], np.cumprod(np.full(max(n - 1, 0), HASH_BASE, np.uint64))])
            unshift = np.concatenate([[np.uint64(1)], np.cumprod(np.full(max(n - 1, 0), HASH_INVERSE, np.uint64))])
            prefix = np.concatenate([[np.uint64(0)], np.cumsum(ids * powers[:n], dtype=np.uint64)])
            self._arrays = ids, lengths, prefix, unshift, np.concatenate([[0], np.cumsum(lengths)])
        return self._arrays

    @property
    def lines(self):
        if self._lines is None:
            self._lines = [line.strip() for line in self.text.split("\n") if line.strip()]
        return self._lines


def ngram_counts(doc, n):
    """(occurrences of the n-gram starting at each word, characters in it) as arrays, or None with fewer words."""
    ids, lengths, prefix, unshift, chars = doc.word_arrays()
    if len(ids) < n:
        return None
    m = len(ids) - n + 1
    key = (prefix[n:n + m] - prefix[:m]) * unshift[:m]  # sum_j ids[i+j] P^j mod 2^64 (arrays wrap silently)
    order = np.argsort(key)
    ordered = key[order]
    first = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    group_sizes = np.append(first[1:], m) - first
    counts = np.empty(m, dtype=np.int64)
    counts[order] = np.repeat(group_sizes, group_sizes)
    return counts, chars[n:n + m] - chars[:m]


def top_ngram_fraction(doc, n):
    """Characters covered by the most frequent word n-gram (each occurrence) over all word characters (Gopher);
    among equally frequent n-grams the longest counts. 0 when no n-gram repeats."""
    found = ngram_counts(doc, n)
    if found is None or found[0].max() < 2:
        return 0.0
    count, chars = found
    top = count == count.max()
    return float(count.max() * chars[top].max()) / max(1, doc.word_arrays()[-1][-1])


def duplicate_ngram_fraction(doc, n):
    """Characters of words inside word n-grams that occur more than once, over all word characters (Gopher)."""
    found = ngram_counts(doc, n)
    if found is None:
        return 0.0
    starts = np.flatnonzero(found[0] > 1)
    lengths = doc.word_arrays()[1]
    covered = np.zeros(len(lengths), dtype=bool)
    for i in range(n):
        covered[starts + i] = True
    return float(lengths[covered].sum()) / max(1, lengths.sum())


def duplicate_lines(lines):
    """(fraction of lines that repeat an earlier one, fraction of characters in them)."""
    seen, dup, dup_chars = set(), 0, 0
    for line in lines:
        if line in seen:
            dup, dup_chars = dup + 1, dup_chars + len(line)
        seen.add(line)
    return dup / max(1, len(lines)), dup_chars / max(1, sum(map(len, lines)))


def mean_word_length(doc):
    return sum(map(len, doc.words)) / max(1, len(doc.words))


def fraction(items, predicate):
    return sum(1 for x in items if predicate(x)) / max(1, len(items))


# name -> f(doc, threshold): True when the document passes (rules set to None or False are skipped)
CHECKS = {
    "min_chars": lambda d, t: len(d.text) >= t,
    "max_chars": lambda d, t: len(d.text) <= t,
    "min_words": lambda d, t: len(d.words) >= t,
    "max_words": lambda d, t: len(d.words) <= t,
    "min_mean_word_length": lambda d, t: mean_word_length(d) >= t,
    "max_mean_word_length": lambda d, t: mean_word_length(d) <= t,
    "max_symbol_word_ratio": lambda d, t: (d.text.count("#") + sum(d.text.count(e) for e in ELLIPSES))
                                          / max(1, len(d.words)) <= t,
    "max_bullet_lines": lambda d, t: fraction(d.lines, lambda s: s.startswith(BULLETS)) <= t,
    "max_ellipsis_lines": lambda d, t: fraction(d.lines, lambda s: s.endswith(ELLIPSES)) <= t,
    "min_alpha_words": lambda d, t: 1 - len(NO_LETTER_WORD.findall(d.text)) / max(1, len(d.words)) >= t,
    "min_stop_words": lambda d, t: len(STOP_WORDS.intersection(map(str.lower, d.words))) >= t,
    "min_punctuated_lines": lambda d, t: fraction(d.lines, lambda s: s.endswith(TERMINAL_PUNCTUATION)) >= t,
    "max_short_lines": lambda d, t: fraction(d.lines, lambda s: len(s) <= 30) <= t,
    "max_duplicate_lines": lambda d, t: duplicate_lines(d.lines)[0] <= t,
    "max_duplicate_line_chars": lambda d, t: duplicate_lines(d.lines)[1] <= t,
    "max_top_2gram": lambda d, t: top_ngram_fraction(d, 2) <= t,
    "max_top_3gram": lambda d, t: top_ngram_fraction(d, 3) <= t,
    "max_top_4gram": lambda d, t: top_ngram_fraction(d, 4) <= t,
    "max_dup_5gram": lambda d, t: duplicate_ngram_fraction(d, 5) <= t,
    "max_dup_10gram": lambda d, t: duplicate_ngram_fraction(d, 10) <= t,
    "no_lorem_ipsum": lambda d, t: "lorem ipsum" not in d.text.lower(),
    "no_curly_bracket": lambda d, t: "{" not in d.text,
}
assert list(CHECKS) == list(RULES)


def first_failed_rule(text, rules=RULES, names=None):
    """The name of the first enabled rule (of `names`, default all) the document fails, or None when it passes."""
    doc = Doc(text)
    for name in names or rules:
        threshold = rules[name]
        if threshold is not None and threshold is not False and not CHECKS[name](doc, threshold):
            return name
    return None
