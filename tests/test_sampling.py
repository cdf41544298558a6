"""nanogpt/sampling.py: each filter alone and combined against hand-computed distributions, ties, penalties, greedy,
all-masked rows, a naive float64 reference on random logits, draws that follow the distribution, seeded runs that
reproduce alone and batched, bad settings in one line, and stop strings on text that arrives in pieces."""
import math
import random

import pytest
import torch
from conftest import assert_one_clear_line, run_script
from test_sample import SPEC, tiny_run

import sample
from nanogpt.sampling import SamplingParams, StopChecker, TextStream, distribution, next_tokens
from nanogpt.tokenizer import Tokenizer


def probs_of(values, **settings):
    """The sampler's distribution for one row of logits given as plain numbers."""
    logits = torch.tensor([values], dtype=torch.float64)
    return distribution(logits, SamplingParams(**settings))[0].tolist()


def normalised(weights):
    total = sum(weights)
    return [w / total for w in weights]


def close(got, want):
    assert got == pytest.approx(want, abs=1e-12), (got, want)


P = [0.5, 0.3, 0.15, 0.05]
LOGP = [math.log(p) for p in P]


def test_temperature_alone_scales_the_logits():
    close(probs_of([1.0, 0.0], temperature=0.5), normalised([math.exp(2), 1]))
    close(probs_of([1.0, 0.0], temperature=2.0), normalised([math.exp(0.5), 1]))
    close(probs_of(LOGP), P)  # T = 1 leaves the model's distribution alone


def test_top_k_alone_and_its_ties():
    close(probs_of([3.0, 2.0, 1.0, 0.0], top_k=2), normalised([math.exp(3), math.exp(2), 0, 0]))
    # both tokens tied at the 2nd value stay: the cut is by value, not by sort position
    close(probs_of([2.0, 1.0, 1.0, 0.0], top_k=2), normalised([math.exp(2), math.exp(1), math.exp(1), 0]))
    close(probs_of([3.0, 2.0], top_k=5), normalised([math.exp(3), math.exp(2)]))  # k past the vocabulary: all


def test_top_p_alone_and_its_ties():
    close(probs_of(LOGP, top_p=0.7), normalised([0.5, 0.3, 0, 0]))   # 0.5 < 0.7 so the second joins, then 0.8
    close(probs_of(LOGP, top_p=0.85), normalised([0.5, 0.3, 0.15, 0]))
    close(probs_of(LOGP, top_p=0.4), [1, 0, 0, 0])                   # the top token alone reaches 0.4
    # the nucleus ends inside a tie: every token as probable as its last member stays
    close(probs_of([math.log(p) for p in (0.4, 0.2, 0.2, 0.2)], top_p=0.5), [0.4, 0.2, 0.2, 0.2])
    close(probs_of([math.log(p) for p in (0.4, 0.3, 0.2, 0.1)], top_p=0.5), normalised([0.4, 0.3, 0, 0]))


def test_min_p_alone():
    close(probs_of(LOGP, min_p=0.2), normalised([0.5, 0.3, 0.15, 0]))  # floor 0.1
    close(probs_of(LOGP, min_p=0.3), normalised([0.5, 0.3, 0.15, 0]))  # floor 0.15: equal is kept
    close(probs_of(LOGP, min_p=1.0), [1, 0, 0, 0])


def test_filters_combined_in_order_each_on_the_renormalised_distribution():
    # top-k 3 -> [.5, .3, .15]/.95; top-p 0.8 on that -> mass before the third is .8/.95 > .8 -> [.5, .3]/.8
    close(probs_of(LOGP, top_k=3, top_p=0.8), normalised([0.5, 0.3, 0, 0]))
    # then min-p 0.7: floor 0.7 * .625 = .4375 > .375
    close(probs_of(LOGP, top_k=3, top_p=0.8, min_p=0.7), [1, 0, 0, 0])
    # temperature 2 first: weights sqrt(p); then top-k 3 and min-p 0.5 of the top
    w = [math.sqrt(p) for p in P[:3]]
    kept = [x if x / w[0] >= 0.5 else 0 for x in w]
    close(probs_of(LOGP, temperature=2.0, top_k=3, min_p=0.5), normalised(kept + [0]))


def test_penalties_on_the_raw_logits_then_temperature():
    logits, seen = [1.0, -1.0, 0.5, 2.0], [[0, 1, 1]]
    # repetition 2: 1 -> 0.5, -1 -> -2; frequency 0.5 x counts (1, 2); presence 0.25 on the two seen ids
    want = [0.5 - 0.5 - 0.25, -2.0 - 1.0 - 0.25, 0.5, 2.0]
    got = distribution(torch.tensor([logits], dtype=torch.float64),
                       SamplingParams(temperature=0.5, repetition_penalty=2.0, frequency_penalty=0.5,
                                      presence_penalty=0.25), seen)[0].tolist()
    close(got, normalised([math.exp(x / 0.5) for x in want]))
    # greedy sees the penalised logits: a repeated favourite loses to the runner-up
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert next_tokens(logits, SamplingParams(temperature=0)).item() == 0
    assert next_tokens(logits, SamplingParams(temperature=0, presence_penalty=2.0), [[0]]).item() == 1
    assert next_tokens(logits, SamplingParams(temperature=0, repetition_penalty=1.3), [[0, 0]]).item() == 1
    # negative penalties encourage repetition; nothing generated yet: no change
    assert next_tokens(logits, SamplingParams(temperature=0, frequency_penalty=-2.0), [[2, 2, 2]]).item() == 2
    assert next_tokens(logits, SamplingParams(temperature=0, presence_penalty=2.0), [[]]).item() == 0


def test_greedy_ties_take_the_lowest_id_and_rows_may_differ():
    logits = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(top_k=1)]
    assert next_tokens(logits, params).tolist() == [1, 0, 0]


def test_all_masked_or_nan_rows_are_refused_naming_the_row():
    logits = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")], [float("nan"), 0.0]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2\] have no finite logit"):
        next_tokens(logits, SamplingParams())
    with pytest.raises(ValueError, match=r"\[1\]"):
        next_tokens(logits[:2], SamplingParams(temperature=0))
    # -inf on all but one token (a padded vocabulary): that token, whatever the filters
    row = torch.tensor([[float("-inf"), 2.0, float("-inf")]])
    assert next_tokens(row, SamplingParams(top_p=0.1, min_p=0.9, top_k=1, temperature=3)).item() == 1


def naive_distribution(logits, p):
    """A plain-Python float64 reading of the documented order, for random rows."""
    z = [x / p.temperature for x in logits]
    alive = list(range(len(z)))
    if p.top_k:
        kth = sorted(z, reverse=True)[min(p.top_k, len(z)) - 1]
        alive = [i for i in alive if z[i] >= kth]

    def probs():
        m = max(z[i] for i in alive)
        total = sum(math.exp(z[i] - m) for i in alive)
        return {i: math.exp(z[i] - m) / total for i in alive}
    if p.top_p < 1:
        q, mass, nucleus = probs(), 0.0, []
        for i in sorted(alive, key=lambda i: -q[i]):
            if mass >= p.top_p:
                break
            nucleus.append(i)
            mass += q[i]
        least = min(q[i] for i in nucleus)
        alive = [i for i in alive if q[i] >= least]
    if p.min_p:
        q = probs()
        top = max(q.values())
        alive = [i for i in alive if q[i] >= p.min_p * top]
    q = probs()
    return [q.get(i, 0.0) for i in range(len(z))]


def test_random_rows_match_a_naive_float64_reference(seed):
    rng = random.Random(seed)
    for _ in range(60):
        V = rng.randint(1, 12)
        # small integers make ties common; distinct values come from the wide draws
        row = [float(rng.randint(-3, 3)) if rng.random() < 0.5 else rng.uniform(-4, 4) for _ in range(V)]
        p = SamplingParams(temperature=rng.choice([0.3, 1.0, 1.7]), top_k=rng.choice([0, 1, 2, 5]),
                           top_p=rng.choice([1.0, 0.9, 0.5, 0.13]), min_p=rng.choice([0.0, 0.05, 0.4]))
        got = distribution(torch.tensor([row], dtype=torch.float64), p)[0].tolist()
        want = naive_distribution(row, p)
        assert got == pytest.approx(want, abs=1e-9), (row, p)


def test_draws_follow_the_distribution(seed):
    logits = torch.tensor([LOGP] * 4000, dtype=torch.float32)
    params = SamplingParams(top_k=3, seed=seed)
    tokens = next_tokens(logits, params, generators=params.generator())
    counts = torch.bincount(tokens, minlength=4).double() / len(tokens)
    want = torch.tensor(normalised([0.5, 0.3, 0.15, 0]), dtype=torch.float64)
    assert counts[3] == 0
    # 4000 draws: a standard error below 0.008 per frequency; 5 of them
    assert torch.allclose(counts, want, atol=0.04), counts


def test_seeded_runs_reproduce_alone_and_batched(seed):
    V = 50
    steps = [torch.randn(3, V) for _ in range(20)]
    mine = SamplingParams(temperature=1.2, top_p=0.95, seed=seed)

    def run(rows, params, generators):
        return [next_tokens(s[rows], params, generators=generators).tolist() for s in steps]
    alone = run([0], mine, mine.generator())
    assert run([0], mine, mine.generator()) == alone
    others = [SamplingParams(seed=seed + 1), SamplingParams(temperature=0)]
    batched = run([0, 1, 2], [mine] + others, [mine.generator(), others[0].generator(), None])
    assert [b[0] for b in batched] == [a[0] for a in alone]
    assert run([0], SamplingParams(temperature=1.2, top_p=0.95, seed=seed + 7),
               SamplingParams(seed=seed + 7).generator()) != alone


@pytest.mark.parametrize("settings, needle", [
    ({"temperature": -1}, "temperature must be >= 0"), ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"top_k": -2}, "top_k must be"), ({"top_k": 1.5}, "top_k must be"), ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty must be in [-2, 2]"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", ""]}, "stop must be non-empty strings"), ({"seed": 1.5}, "seed must be"),
    ({"top_k": "5"}, "top_k must be a finite number")])
def test_bad_settings_are_one_line(settings, needle):
    with pytest.raises(ValueError) as info:
        SamplingParams(**settings).check()
    message = str(info.value)
    assert needle in message and "\n" not in message and message.startswith("sampling: ")


def test_good_settings_pass_and_a_single_stop_string_is_a_tuple():
    p = SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.1, stop="\n", seed=3).check()
    assert p.stop == ("\n",)


def feed_all(stop, pieces):
    checker, shown = StopChecker(stop), []
    for piece in pieces:
        text, stopped = checker.feed(piece)
        shown.append(text)
        if stopped:
            return "".join(shown), True
    return "".join(shown) + checker.flush(), False


def test_stop_strings_across_pieces():
    assert feed_all(["END"], ["abcE", "N", "Dxyz"]) == ("abc", True)
    checker = StopChecker(["END"])
    assert checker.feed("abcE") == ("abc", False)        # "E" could start END: held back
    assert checker.feed("Nx") == ("ENx", False)          # it did not
    assert feed_all(["END"], ["abcEN"]) == ("abcEN", False)  # the text ends: the held tail is shown
    assert feed_all(["ab", "b"], ["xa", "b"]) == ("x", True)  # completed at once: the longer one cuts
    assert feed_all(["aba", "b"], ["xaba"]) == ("xa", True)   # "b" is complete before "aba" is
    assert feed_all([], ["a", "b"]) == ("ab", False)


def test_stop_strings_on_random_splits_match_cutting_the_whole_text(seed):
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        # character by character: the first prefix of text that ends with a stop string, cut before it
        ends = [(e, e - len(s)) for e in range(len(text) + 1) for s in stop if text[:e].endswith(s)]
        want = (text[:min(ends)[1]], True) if ends else (text, False)
        assert feed_all(stop, pieces) == want, (text, stop, pieces)


def test_text_stream_waits_for_a_split_character_and_stops():
    tok = Tokenizer({"kind": "gpt2"})
    ids = tok.encode("naïve café ☃ END more")
    stream, shown = TextStream(tok, ["END"]), ""
    for i in ids:
        text, stopped = stream.push(i)
        assert "\ufffd" not in text
        shown += text
        if stopped:
            break
    assert stopped and shown == "naïve café ☃ "
    snowman = tok.encode("☃")  # three bytes, more than one token
    stream = TextStream(tok)
    assert [stream.push(i) for i in snowman][-1] == ("☃", False) and stream.finish() == ""
    stream = TextStream(Tokenizer({"kind": "char", "chars": "abE"}), ["EE"])
    assert [stream.push(i)[0] for i in (0, 2, 1)] == ["a", "", "Eb"]
    stream.push(2)
    assert stream.finish() == "E"  # generation ended on a partial stop string: shown after all


def test_sample_py_cuts_at_a_stop_string_and_refuses_a_bad_setting_in_one_line(tmp_path):
    _, model = tiny_run(tmp_path)
    tok, prompt = Tokenizer(SPEC), Tokenizer(SPEC).encode("ROMEO:")
    greedy = SamplingParams(temperature=0, max_tokens=20)
    whole = tok.decode(sample.generate(model, torch.tensor([prompt] * 2), greedy, tok)[0])
    stop = whole[5:7]
    params = SamplingParams(temperature=0, max_tokens=20, stop=(stop,))
    rows = sample.generate(model, torch.tensor([prompt] * 2), params, tok)
    assert len(rows[0]) < 20 and stop in tok.decode(rows[0])  # generation ended once every row held it
    assert sample.sample_text(tok, prompt, rows[0], params.stop) == "ROMEO:" + whole[:whole.find(stop)]
    assert_one_clear_line(run_script("sample.py", "--out_dir=nowhere", "--min_p=2", check=False),
                          "min_p must be in [0, 1], got 2")
