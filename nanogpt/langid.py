"""Language identification with py3langid (an optional dependency: `pip install py3langid`).

Why py3langid: its model (langid.py's naive Bayes over byte n-grams, 97 languages, Lui & Baldwin 2012) ships inside
the package as a 4.5 MB numpy archive read without pickle, so nothing is downloaded at run time; it needs only
numpy, classifies a 1 KB text in about 0.1 ms on this machine, and gives a normalised probability to threshold.
(lingua is more accurate on short texts but its models are ~100 MB-1 GB per configuration; fastText's lid.176 is
a separate 126 MB download.)

    identify = load_identifier()
    lang, confidence = identify(text)      # ("en", 0.99)
"""


def load_identifier():
    """A function text -> (ISO 639-1 code, probability in [0, 1]); a ValueError saying what to install without it."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise ValueError("language identification needs the py3langid package: pip install py3langid, "
                         "or set --languages= (empty) to switch it off") from None
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def identify(text):
        lang, prob = identifier.classify(text)
        return lang, float(prob)
    return identify
