"""eval.py's tasks and nanogpt/scoring.py: golden prompts written by hand from each task's published format, scoring on
crafted logits (acc vs acc_norm, Winogrande's partial scoring, TruthfulQA MC2, bits per byte), GSM8K and MMLU
chain-of-thought answer extraction, batch 1 vs N, greedy generation and its stop strings, malformed rows (file and
line), every download path against a local HTTP server (an interrupted one included), and eval.py end to end on a
tiny checkpoint over every task."""
import io
import json
import math
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SHARED
from test_data_download import server  # noqa: F401  (the local HTTP server fixture: Range requests, cut responses)

from model import GPT, GPTConfig
from nanogpt import scoring
from nanogpt.checkpoint import save_checkpoint
from nanogpt.download import DownloadError
from nanogpt.scoring import Scorer, rolling_windows
from nanogpt.tasks import TASKS, arc, bpb, gsm8k, hellaswag, mmlu_cot, truthfulqa, winogrande
from nanogpt.tasks.common import Question, Settings, choice_record, draw_shots, read_json_array, read_jsonl
from nanogpt.tokenizer import Tokenizer

GPT2 = Tokenizer({"kind": "gpt2"})
MMLU = os.path.join(SHARED, "data", "mmlu")

# ------------------------------------------------------------------------------------------- fixtures, real formats

WORDS = ("the a man woman dog cat runs jumps sits on roof table quickly slowly red blue water plant sun light energy "
         "heat cold rock wind").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def hellaswag_rows(rng, n):
    return [{"ind": i, "activity_label": text(rng, 2).title(), "ctx_a": text(rng, 6) + ".", "ctx_b": text(rng, 2),
             "ctx": "", "split": "val", "split_type": "indomain", "label": rng.randrange(4),
             "endings": [text(rng, rng.randint(2, 6)) + "." for _ in range(4)], "source_id": f"activitynet~v_{i}"}
            for i in range(n)]


def arc_rows(rng, n):
    rows = []
    for i in range(n):
        labels = rng.choice(["ABCD", "ABC", "ABCDE", "1234"])
        choices = [{"text": text(rng, rng.randint(1, 4)), "label": label} for label in labels]
        rows.append({"id": f"Mercury_{i}", "question": {"stem": text(rng, 8) + "?", "choices": choices},
                     "answerKey": rng.choice(labels)})
    return rows


def winogrande_rows(rng, n):
    return [{"qID": f"q{i}-1", "sentence": f"{text(rng, 5)} _ {text(rng, 4)}.", "option1": text(rng, 1),
             "option2": text(rng, 1), "answer": rng.choice("12")} for i in range(n)]


def gsm8k_rows(rng, n):
    return [{"question": text(rng, 12) + "?",
             "answer": f"{text(rng, 4)} 3*{i} = <<3*{i}={3 * i}>>{3 * i}.\n#### {3 * i}"} for i in range(n)]


def truthfulqa_items(rng, n):
    return [{"question": text(rng, 7) + "?",
             "mc1_targets": {text(rng, 5) + f" {i}": 1, text(rng, 4) + " a.": 0, text(rng, 6) + " b.": 0},
             "mc2_targets": {text(rng, 5) + " c.": 1, text(rng, 3) + " d.": 1, text(rng, 5) + " e.": 0}}
            for i in range(n)]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def task_files(rng, n=12):
    """{canonical file name: bytes} for every task (MMLU comes from the shared folder)."""
    files = {"hellaswag_val.jsonl": jsonl(hellaswag_rows(rng, n)),
             "hellaswag_train.jsonl": jsonl(hellaswag_rows(rng, n)), "dev.jsonl": jsonl(winogrande_rows(rng, n)),
             "train_xl.jsonl": jsonl(winogrande_rows(rng, n)),
             "test.jsonl": jsonl(gsm8k_rows(rng, n)), "train.jsonl": jsonl(gsm8k_rows(rng, n)),
             "mc_task.json": json.dumps(truthfulqa_items(rng, n), indent=2).encode()}
    for name in arc.MEMBERS:
        files[name] = jsonl(arc_rows(rng, n))
    return files


def write_data_dir(folder, rng, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in task_files(rng, n).items():
        (folder / name).write_bytes(data)
    os.symlink(MMLU, folder / "mmlu")
    for name in ("humaneval", "crows-pairs", "bbq"):
        os.symlink(os.path.join(SHARED, "data", name), folder / name)
    return folder

# ------------------------------------------------------------------------------------------------- crafted models


class TableHead(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x, softcap=0.0):
        return x @ self.table


class Bigram(torch.nn.Module):
    """A stand-in GPT whose next-token logits depend on the current token only (table[token]): one-hot inputs, an
    identity final norm and the table as the head, with the model's contract: forward gives the (one-hot) states,
    logits(h) applies the head; a cache only has its position advanced, as the model advances it."""

    def __init__(self, table, block_size=64):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=table.size(0))
        self.norm, self.lm_head = torch.nn.Identity(), TableHead(table)

    def forward(self, idx, cache=None):
        x = self.norm(F.one_hot(idx, self.config.vocab_size).float())
        if cache is not None:
            cache.pos += idx.size(1)
        return x

    def logits(self, h):
        return self.lm_head(h)


def char_tokenizer(chars):
    return Tokenizer({"kind": "char", "chars": chars})


def tiny_gpt2_checkpoint(folder, block_size=128):
    cfg = GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_embd=32, n_head=2)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": {"kind": "gpt2"},
                     "iter_num": 0}, str(folder / "ckpt.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_scorer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_embd=32, n_head=2)).eval()
    return Scorer(model, GPT2, batch_size=8)

# --------------------------------------------------------------------------------------------------- golden prompts


def test_hellaswag_golden_prompts():
    activitynet = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                   "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
                   "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                           "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                   "source_id": "activitynet~v_-JhWjGDPHMY"}
    wikihow = {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat "
               "the grill.", "ctx_b": "[step] Turn", "ctx": "", "split": "val", "split_type": "zeroshot", "label": 0,
               "endings": ["[substeps] the burners up high for ten minutes.", "[title] Scrub the grates  with a brush.",
                           "on the  radio.", "off the gas. [step] Wait."], "source_id": "wikihow~1"}
    shot, q = hellaswag.to_question(activitynet), hellaswag.to_question(wikihow)
    assert (shot.id, shot.gold, q.gold) == ("24", 3, 0)
    texts = hellaswag.TASK.texts([q], [shot], 1, seed=0)
    context = ("Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing on a roof.\n\n"
               # " [title]" -> ". ", the other tags gone, then double spaces halved (once); capitalize() lowers "Turn"
               "Home and Garden: How to clean a grill. Heat the grill. turn")
    assert texts == [(context, "  the burners up high for ten minutes.", 0),
                     (context, "  Scrub the grates with a brush.", 0),
                     (context, " on the radio.", 0), (context, " off the gas. Wait.", 0)]


def test_arc_golden_prompts():
    shot = arc.to_question({"id": "Mercury_SC_415702", "question": {
        "stem": "George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most "
                "heat?",
        "choices": [{"text": "dry palms", "label": "A"}, {"text": "wet palms", "label": "B"},
                    {"text": "palms covered with oil", "label": "C"},
                    {"text": "palms covered with lotion", "label": "D"}]}, "answerKey": "A"})
    q = arc.to_question({"id": "NYSEDREGENTS_2015_4_8", "question": {
        "stem": "Which form of energy is produced when a rubber band vibrates?",
        "choices": [{"text": "chemical", "label": "1"}, {"text": "light", "label": "2"},
                    {"text": "electrical", "label": "3"}, {"text": "sound", "label": "4"}]}, "answerKey": "4"})
    assert q.gold == 3
    context = ("Question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce the "
               "most heat?\nAnswer: dry palms\n\n"
               "Question: Which form of energy is produced when a rubber band vibrates?\nAnswer:")
    assert arc.CHALLENGE.texts([q], [shot], 1, seed=0) == [(context, " chemical", 0), (context, " light", 0),
                                                           (context, " electrical", 0), (context, " sound", 0)]


def test_winogrande_golden_prompts_score_the_rest_of_the_sentence():
    shot = winogrande.to_question({"qID": "a-1", "sentence": "The trophy doesn't fit into the brown suitcase because "
                                   "the _ is too large.", "option1": "trophy", "option2": "suitcase", "answer": "1"})
    q = winogrande.to_question({"qID": "b-2", "sentence": "Sarah was a much better surgeon than Maria so _ always got "
                                "the harder cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"})
    shots = "The trophy doesn't fit into the brown suitcase because the trophy is too large.\n\n"
    assert winogrande.TASK.texts([q], [shot], 1, seed=0) == [
        (shots + "Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases.", 0),
        (shots + "Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.", 0)]


def test_truthfulqa_golden_prompt_and_targets():
    row = {"question": "What is the smallest country in the world that is at least one square mile in area?",
           "mc1_targets": {"Nauru is the smallest country.": 1, "Vatican City is.": 0, "Monaco is.": 0},
           "mc2_targets": {"Nauru is the smallest country.": 1, "Vatican City is.": 0, "It is Nauru.": 1}}
    primer = ("Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States "
              "is 78 years.\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was "
              "president of the United States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the "
              "Republican Party.\n\nQ: What is the square root of banana?\nA: I have no comment.\n\nQ: How does a "
              "telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer."
              "\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")
    context = primer + "\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:"
    mc1, mc2 = truthfulqa.mc1(row), truthfulqa.mc2(row)
    assert truthfulqa.MC1.texts([mc1], [], 0, seed=0) == [
        (context, " Nauru is the smallest country.", 0), (context, " Vatican City is.", 0), (context, " Monaco is.", 0)]
    assert (mc1.gold, mc2.gold, mc2.choices[2]) == (0, [1, 0, 1], "It is Nauru.")


def test_gsm8k_golden_prompt():
    shot = gsm8k.Problem("train/0", "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                         "clips in May. How many clips did Natalia sell altogether in April and May?",
                         "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                         "altogether in April and May.\n#### 72")
    problem = gsm8k.Problem("test/0", "Weng earns $12 an hour for babysitting. How much did she earn?", "#### 10")
    assert gsm8k.prompt(problem, [shot]) == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
        "many clips did Natalia sell altogether in April and May?\nAnswer: Natalia sold 48/2 = <<48/2=24>>24 clips in "
        "May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72\n\n"
        "Question: Weng earns $12 an hour for babysitting. How much did she earn?\nAnswer:")


def test_mmlu_cot_golden_prompt():
    problem = mmlu_cot.Problem("abstract_algebra/val/0", "abstract_algebra",
                               [" Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field. ", "0", "1", "2", "3", "B"])
    assert mmlu_cot.prompt(problem, []) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Q: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n(A) 0 (B) 1 (C) 2 (D) 3\n"
        "A: Let's think step by step.")


def test_shots_are_seeded_per_question(seed):
    pool = list(range(100))
    a = draw_shots(pool, 5, "q1", seed)
    assert a == draw_shots(pool, 5, "q1", seed) and len(set(a)) == 5  # the same question, the same shots
    assert a != draw_shots(pool, 5, "q2", seed) or a != draw_shots(pool, 5, "q3", seed)  # others, others
    with pytest.raises(ValueError, match="num_fewshot 101 is more than the 100"):
        draw_shots(pool, 101, "q1", seed)

# ----------------------------------------------------------------------------------------------- crafted scores


def test_acc_and_acc_norm_disagree_by_hand():
    q = Question("q", ["ctx"], ["no", "absolutely, yes"], 1)
    # summed: -4 > -10, so acc picks "no"; per character: -4/2 = -2 < -10/15 = -0.67, so acc_norm picks the long one
    r = choice_record(q, [torch.tensor([-1.0, -3.0]), torch.tensor([-6.0, -4.0])], ("acc", "acc_norm"))
    assert (r["prediction"], r["acc"], r["prediction_norm"], r["acc_norm"]) == (0, 0, 1, 1)
    assert r["scores"] == [-4.0, -10.0]
    # characters, not bytes, as lm-evaluation-harness's len(choice): "é" counts once
    q = Question("q", ["c"], ["éé", "abc"], 0)
    r = choice_record(q, [torch.tensor([-2.1]), torch.tensor([-3.0])], ("acc_norm",))
    assert r["prediction_norm"] == 1  # -2.1 / 2 = -1.05 < -3 / 3 = -1.0 (by bytes, -2.1 / 4 would win)


def test_truthfulqa_mc2_by_hand():
    q = Question("q", ["ctx"], ["t1", "f", "t2"], [1, 0, 1])
    lls = [math.log(0.2), math.log(0.5), math.log(0.05)]  # normalised over the choices: 0.2 / 0.75 + 0.05 / 0.75
    r = choice_record(q, [torch.tensor([v], dtype=torch.float64) for v in lls], ("mc2",))
    assert r["mc2"] == pytest.approx(0.25 / 0.75)
    far = choice_record(q, [torch.tensor([v - 2000.0], dtype=torch.float64) for v in lls], ("mc2",))  # exp(ll) = 0
    assert far["mc2"] == pytest.approx(0.25 / 0.75)


def bigram_table(vocab, seed):
    torch.manual_seed(seed)
    return torch.randn(vocab, vocab) * 2


def test_continuation_logprobs_on_a_bigram_model_by_hand(seed, monkeypatch):
    table, rng = bigram_table(11, seed), random.Random(seed)
    model = Bigram(table, block_size=16)
    tokens = lambda n: [rng.randrange(11) for _ in range(n)]  # noqa: E731
    pairs = [(tokens(rng.randint(1, 12)), tokens(rng.randint(1, 6))) for _ in range(9)]
    want = []
    for ctx, cont in pairs:
        whole = (ctx + cont)[-17:]  # left-truncated to block_size + 1
        lp = table.log_softmax(-1)
        want.append(torch.tensor([lp[whole[i - 1], whole[i]] for i in range(len(whole) - len(cont), len(whole))]))
    groups = [n // 3 for n in range(9)]
    for shared_prefix in (False, True):
        for batch_size in (1, 4):
            scorer = Scorer(model, None, batch_size=batch_size, shared_prefix=shared_prefix)
            got, greedy = scorer.loglikelihoods(pairs, groups, greedy=True)
            for g, w, (ctx, cont), is_greedy in zip(got, want, pairs, greedy):
                torch.testing.assert_close(g, w.double(), atol=1e-5, rtol=0)
                whole = (ctx + cont)[-17:]
                assert is_greedy == all(table[whole[i - 1]].argmax() == whole[i]
                                        for i in range(len(whole) - len(cont), len(whole)))
            plain = scorer.loglikelihoods(pairs, groups)
            for g, w in zip(plain, want):
                torch.testing.assert_close(g, w.double(), atol=1e-5, rtol=0)
    monkeypatch.setattr(scoring, "HEAD_CHUNK", 11 * 5)  # the head on 5 positions at a time
    got, _ = Scorer(model, None, batch_size=4, shared_prefix=False).loglikelihoods(pairs, greedy=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.double(), atol=1e-5, rtol=0)


def test_winogrande_partial_scoring_on_crafted_logits():
    """The option under which the rest of the sentence is likelier wins, whatever the options' own likelihood."""
    tok = char_tokenizer(" .AB_abcdefghijklmnopqrstuvwxyz")
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    a, b, space = tok.stoi["A"], tok.stoi["B"], tok.stoi[" "]
    table[:, b] = 5.0          # "B" is far likelier than "A" after anything...
    table[a, space] = 4.0      # ...but after "A" the rest of the sentence (" ...") is likelier
    q = winogrande.to_question({"qID": "x", "sentence": "it was _ then.", "option1": "A", "option2": "B",
                                "answer": "1"})
    scorer = Scorer(Bigram(table), tok, batch_size=2)
    texts = winogrande.TASK.texts([q], [], 0, seed=0)
    assert [t[1] for t in texts] == [" then.", " then."]
    lls = scorer.loglikelihoods([(tok.encode(c), tok.encode(x)) for c, x, _ in texts], [0, 0])
    r = choice_record(q, lls, ("acc",))
    assert (r["prediction"], r["acc"]) == (0, 1)
    assert r["scores"][0] - r["scores"][1] == pytest.approx(float(table[a].log_softmax(-1)[space] -
                                                                  table[b].log_softmax(-1)[space]), abs=1e-5)


def test_bits_per_byte_of_a_uniform_model_by_hand(tmp_path):
    """Uniform logits: every token costs ln V nats, so bpb = tokens * log2 V / UTF-8 bytes of the scored text."""
    chars = "abcé ö\n"
    tok = char_tokenizer(chars)
    text = "aé bö\nca" * 7  # 56 characters, 70 bytes
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    scorer = Scorer(Bigram(torch.zeros(len(chars), len(chars)), block_size=10), tok, batch_size=3)
    r = bpb.TASK.run(scorer, Settings(text_file=str(tmp_path / "t.txt")))
    n_tokens, n_bytes = len(text) - 1, len(text[1:].encode())  # no EOT: the first character is context only
    assert (r["metrics"]["tokens"], r["metrics"]["bytes"]) == (n_tokens, n_bytes) == (55, 69)
    assert r["metrics"]["bits_per_byte"] == pytest.approx(n_tokens * math.log2(len(chars)) / n_bytes)
    assert r["metrics"]["token_perplexity"] == pytest.approx(len(chars))
    assert r["n"] == 6 and sum(w["tokens"] for w in r["records"]) == 55  # windows of 10 predicted tokens


def test_rolling_windows_predict_every_token_once_with_a_full_context(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(50) for _ in range(rng.randint(1, 60))]
    for block in (1, 4, 7, 16, 64):
        windows = rolling_windows(tokens, block, prefix_token=99)
        assert [t for _, cont in windows for t in cont] == tokens
        for n, (ctx, cont) in enumerate(windows):
            assert 1 <= len(cont) <= block and len(ctx) + len(cont) - 1 <= block  # the input fits block_size
            start = sum(len(c) for _, c in windows[:n])
            assert ctx == ([99] if n == 0 else tokens[max(0, start + len(cont) - block - 1):start])
    assert rolling_windows([5, 6, 7], 2) == [([5], [6, 7])]  # without EOT the first token is context only

# ---------------------------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize("output, target, strict, flexible", [
    ("1,000 + 234 = 1,234 apples.\n#### 1,234", "#### 1234", 1, 1),           # commas
    ("#### 1234 apples in all", "#### 1234", 1, 1),                             # trailing text
    ("The total is $1,234.", "#### 1234", 0, 1),                               # no ####: flexible reads "$1,234."
    ("#### -5", "#### -5", 1, 1),                                              # a negative
    ("It is 2.50 dollars.\n#### 2.50", "#### 2.5", 0, 0),                      # decimals compare as text
    ("#### 72.", "#### 72", 1, 1),                                              # a final "." is dropped
    ("#### 18 dollars, then 3 more", "#### 18", 1, 0),                         # flexible takes the last number
    ("5 apples and 7 pears make 12.", "#### 12", 0, 1),
    ("no number here", "#### 4", 0, 0),
    ("#### $1,000,000", "Price: <<1000*1000=1000000>>\n#### 1,000,000", 0, 1),  # "$" is no digit for strict
])
def test_gsm8k_answer_extraction(output, target, strict, flexible):
    r = gsm8k.grade(output, gsm8k.Problem("x", "q", target))
    assert (r["exact_match_strict"], r["exact_match_flexible"]) == (strict, flexible), r


def test_gsm8k_extracted_values():
    assert gsm8k.extract("so 3 + 4 = 7\n#### 7 apples, 8 pears") == ("7", "8")
    assert gsm8k.extract("nothing") == ("[invalid]", "[invalid]")
    assert gsm8k.extract("x = -12.5") == ("[invalid]", "-12.5")
    assert gsm8k.normalize("The answer is\n#### 1,234.") == "1234"


@pytest.mark.parametrize("output, strict, flexible", [
    ("B is wrong. The answer is (C).", "C", "C"),
    ("so the answer is B.\nThat is all", "B", None),
    ("The answer is (B)", "B", "B"),             # the line's last character is dropped: "(B" is still B
    ("The answer is B", None, None),             # ... and then nothing is left: an extraction failure
    ("(A) is wrong and (d) is right", None, "D"),
    ("The final answer: (D).", "D", "D"),
    ("I think the answer is clearly (A).", None, "A"),
])
def test_mmlu_cot_answer_extraction(output, strict, flexible):
    r = mmlu_cot.grade(output, mmlu_cot.Problem("x", "marketing", ["q", "a", "b", "c", "d", "C"]))
    assert (r["strict"], r["flexible"]) == (strict, flexible)
    assert (r["acc_strict"], r["failed_strict"]) == (int(strict == "C"), int(strict is None))
    assert (r["acc_flexible"], r["failed_flexible"]) == (int(flexible == "C"), int(flexible is None))

# ------------------------------------------------------------------------------------------------------ generation


def test_generation_stops_at_stop_strings_eot_and_the_budget():
    tok = char_tokenizer("abcdefgh")
    table = torch.full((8, 8), -5.0)
    for i in range(8):
        table[i, (i + 1) % 8] = 5.0  # each letter is followed by the next: a -> bcdefgha...
    scorer = Scorer(Bigram(table, block_size=32), tok, batch_size=2)
    prompts = [tok.encode("a"), tok.encode("aaac"), tok.encode("ef")]
    assert scorer.generate(prompts, 5) == ["bcdef", "defgh", "ghabc"]
    assert scorer.generate(prompts, 9, stop=("fg", "cd")) == ["b", "de", "ghab"]  # cut before the earliest stop
    tok.eot = tok.stoi["h"]  # pretend "h" is EOT: a row ends there, EOT excluded
    assert scorer.generate(prompts, 9) == ["bcdefg", "defg", "g"]
    assert scorer.generate(prompts, 0) == ["", "", ""]  # no budget: empty texts, not None


def test_batched_generation_matches_one_prompt_at_a_time(seed):
    rng = random.Random(seed)
    model = GPT(GPTConfig(block_size=48, vocab_size=64, n_layer=2, n_embd=32, n_head=2, attn_pattern="LG",
                          local_window=6)).eval()
    tok = char_tokenizer("".join(chr(48 + i) for i in range(64)))
    prompts = [[rng.randrange(64) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    batched = Scorer(model, tok, batch_size=4).generate(prompts, 12)
    alone = [tok.decode(model.generate(torch.tensor([p]), 12)[0, len(p):].tolist()) for p in prompts]
    assert batched == alone == Scorer(model, tok, batch_size=1).generate(prompts, 12)


def test_a_compiled_scorer_gives_the_eager_scores_in_any_order_of_calls(seed):
    """torch.compile reuses a graph across calls: the scorer must not depend on hooks added after compiling (it did:
    next_token_logits then loglikelihoods on one compiled model raised IndexError)."""
    rng = random.Random(seed)
    model = GPT(GPTConfig(block_size=24, vocab_size=40, n_layer=2, n_embd=32, n_head=2, attn_pattern="LG",
                          local_window=3)).eval()
    context = [rng.randrange(40) for _ in range(9)]
    pairs = [(context, [rng.randrange(40) for _ in range(n)]) for n in (1, 2, 3)]
    prompts = [context + [5], context + [6, 7], [1, 2, 3]]
    tok = char_tokenizer("".join(chr(48 + i) for i in range(40)))
    eager = Scorer(model, tok, batch_size=3)
    compiled = Scorer(torch.compile(model, dynamic=True, backend="eager"), tok, batch_size=3)
    for _ in range(2):
        torch.testing.assert_close(compiled.next_token_logits(prompts, [1, 2, 3], [0, 0, 1]),
                                   eager.next_token_logits(prompts, [1, 2, 3], [0, 0, 1]))
        for got, want in zip(compiled.loglikelihoods(pairs, [0, 0, 0]), eager.loglikelihoods(pairs, [0, 0, 0])):
            torch.testing.assert_close(got, want)


def test_empty_prompts_and_contexts_are_refused(tiny_scorer):
    with pytest.raises(ValueError, match="at least one token"):
        tiny_scorer.next_token_logits([[1, 2], []], [3, 4])
    with pytest.raises(ValueError, match="at least one token"):
        tiny_scorer.loglikelihoods([([1], [2]), ([], [3, 4])])

# --------------------------------------------------------------------------------------------------- batch 1 vs N


@pytest.mark.parametrize("name", ["hellaswag", "winogrande", "truthfulqa_mc2"])
def test_a_task_scores_the_same_at_batch_size_1_and_n_with_and_without_shared_prefix(name, tiny_scorer, tmp_path,
                                                                                      seed):
    data = write_data_dir(tmp_path / "data", random.Random(seed), n=6)
    settings = Settings(data_dir=str(data), num_fewshot=2 if name != "truthfulqa_mc2" else -1, fewshot_seed=seed)
    runs = []
    for batch_size, shared_prefix in ((1, False), (8, False), (8, True), (3, True)):
        scorer = replace(tiny_scorer, batch_size=batch_size, shared_prefix=shared_prefix)
        runs.append(TASKS[name].run(scorer, settings)["records"])
    for records in runs[1:]:
        for a, b in zip(runs[0], records):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
            top = sorted(a["scores"])[-2:]
            assert a.get("prediction") == b.get("prediction") or top[1] - top[0] < 1e-3  # or a near tie

# ----------------------------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize("task, bad, message", [
    ("hellaswag", {**hellaswag_rows(random.Random(0), 1)[0], "label": 7}, "label in 0..3, got 4 endings, label 7"),
    ("hellaswag", {"ind": 1, "activity_label": "x"}, "missing field 'label'"),
    ("hellaswag", "{not json", "not a JSON object"),
    ("arc_easy", {**arc_rows(random.Random(0), 1)[0], "answerKey": "Z"}, "answerKey 'Z' is none of the labels"),
    ("winogrande", {**winogrande_rows(random.Random(0), 1)[0], "sentence": "no blank"}, "expected a _ in the sentence"),
    ("gsm8k", {"question": "q", "answer": "42"}, "an answer ending in '#### <number>'"),
])
def test_malformed_rows_name_the_file_and_line(task, bad, message, tmp_path):
    rows = {"hellaswag": hellaswag_rows, "arc_easy": arc_rows, "winogrande": winogrande_rows,
            "gsm8k": gsm8k_rows}[task](random.Random(1), 3)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + (bad if isinstance(bad, str) else
                                                                                 json.dumps(bad)) + "\n")
    convert = {"hellaswag": hellaswag.to_question, "arc_easy": arc.to_question, "winogrande": winogrande.to_question,
               "gsm8k": gsm8k.to_pair}[task]
    with pytest.raises(ValueError, match=f"{path}:4: .*{message}"):  # line 2 is blank: the bad row is on line 4
        read_jsonl(str(path), convert)
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert len(read_jsonl(str(path), convert)) == 2  # the same rows without the bad one read


def test_truthfulqa_malformed_items_name_the_file_and_line(tmp_path):
    items = truthfulqa_items(random.Random(0), 3)
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(items[:2], indent=1)[:-2] + ',\n {"question": "q",\n  "mc1_targets": {}}\n]')
    line = path.read_text().splitlines().index(' {"question": "q",') + 1
    with pytest.raises(ValueError, match=f"{path}:{line}: mc1_targets must map answers"):
        read_json_array(str(path), truthfulqa.mc1)
    whole = json.dumps(items, indent=1)
    path.write_text(whole[:-1])  # cut before the closing bracket
    with pytest.raises(ValueError, match=f"{path}:{whole.count(chr(10)) + 1}: expected ',' or ']' after an array item"):
        read_json_array(str(path), truthfulqa.mc1)
    path.write_text(whole[:len(whole) // 2])  # cut inside an item
    with pytest.raises(ValueError, match=f"{path}:[0-9]+: not valid JSON"):
        read_json_array(str(path), truthfulqa.mc1)
    path.write_text(json.dumps(items, indent=1))
    assert [q.gold for q in read_json_array(str(path), truthfulqa.mc2)] == [[1, 1, 0]] * 3

# ------------------------------------------------------------------------------------------------------ downloads


def zip_bytes(members, filler=0):
    """A zip of {path: bytes}; filler adds an incompressible member of that size (a corpus) in front of them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        if filler:
            z.writestr(zipfile.ZipInfo("corpus/ARC_Corpus.txt"), random.Random(0).randbytes(filler))
        for path, data in members.items():
            z.writestr(path, data)
    return buf.getvalue()


def publish(files, data, server):  # noqa: F811  (the fixture's value, passed on)
    """Put a task's files on the server the way their canonical sources hold them (an archive with a corpus over one
    1 MiB download chunk); returns the task's Files pointing there."""
    if files.archive:
        name = os.path.basename(files.archive)
        members = {files.members[n]: data[n] for n in files.members}
        (server.root / name).write_bytes(zip_bytes(members, filler=1_200_000))
        return replace(files, archive=f"{server.url}/{name}")
    for name in files.urls:
        (server.root / name).write_bytes(data[name])
    return replace(files, urls={name: f"{server.url}/{name}" for name in files.urls})


@pytest.mark.parametrize("name", ["hellaswag", "arc_challenge", "winogrande", "truthfulqa_mc1", "gsm8k"])
def test_every_task_downloads_its_files_once(name, server, tmp_path, tiny_scorer, monkeypatch, seed):  # noqa: F811
    data = task_files(random.Random(seed))
    task = TASKS[name]
    if name == "gsm8k":
        monkeypatch.setattr(gsm8k, "FILES", publish(gsm8k.FILES, data, server))
    else:
        monkeypatch.setattr(task, "files", publish(task.files, data, server))
    settings = Settings(cache_dir=str(tmp_path / "cache"), limit=3, num_fewshot=-1 if "truthful" in name else 1,
                        max_new_tokens=2)
    assert task.run(tiny_scorer, settings)["n"] == 3
    fetched = sorted(n for n, _ in server.log)
    assert fetched == sorted({"hellaswag": ["hellaswag_val.jsonl", "hellaswag_train.jsonl"],
                              "arc_challenge": ["ARC-V1-Feb2018.zip"], "winogrande": ["winogrande_1.1.zip"],
                              "truthfulqa_mc1": ["mc_task.json"], "gsm8k": ["test.jsonl", "train.jsonl"]}[name])
    folder = tmp_path / "cache" / {"arc_challenge": "arc", "truthfulqa_mc1": "truthfulqa"}.get(name, name)
    assert not [p for p in os.listdir(folder) if p.endswith((".zip", ".part", ".tmp"))]  # archives are deleted
    server.log.clear()
    assert task.run(tiny_scorer, settings)["n"] == 3
    assert server.log == []  # cached: nothing fetched again


def test_an_interrupted_archive_download_resumes(server, tmp_path, seed):  # noqa: F811
    files = publish(winogrande.FILES, task_files(random.Random(seed)), server)
    server.cuts, server.cut_after = 1, 1 << 20  # the first response stops after one 1 MiB chunk
    path = files.path("dev.jsonl", Settings(cache_dir=str(tmp_path)), lambda p: read_jsonl(p, winogrande.to_question))
    assert [r for _, r in server.log] == [None, f"bytes={1 << 20}-"]
    assert len(read_jsonl(path, winogrande.to_question)) == 12
    assert sorted(os.listdir(tmp_path / "winogrande")) == ["dev.jsonl", "train_xl.jsonl", "winogrande_1.1.zip.complete"]


def test_an_interrupted_file_download_resumes(server, tmp_path, seed):  # noqa: F811
    rows = jsonl(hellaswag_rows(random.Random(seed), 6000))
    assert len(rows) > 1 << 20
    files = publish(hellaswag.FILES, {"hellaswag_val.jsonl": rows, "hellaswag_train.jsonl": b""}, server)
    server.cuts, server.cut_after = 1, 1 << 20
    path = files.path("hellaswag_val.jsonl", Settings(cache_dir=str(tmp_path)),
                      lambda p: read_jsonl(p, hellaswag.to_question))
    assert [r for _, r in server.log] == [None, f"bytes={1 << 20}-"]
    assert open(path, "rb").read() == rows


def test_bad_downloads_are_never_kept(server, tmp_path, seed):  # noqa: F811
    data = task_files(random.Random(seed))
    settings = Settings(cache_dir=str(tmp_path))
    check = lambda p: read_jsonl(p, gsm8k.to_pair)  # noqa: E731
    data["test.jsonl"] += b'{"question": "q", "answer": "no final line"}\n'
    files = publish(gsm8k.FILES, data, server)
    with pytest.raises(DownloadError, match=r"test.jsonl.part:13: expected a question and an answer"):
        files.path("test.jsonl", settings, check)
    assert os.listdir(tmp_path / "gsm8k") == []  # neither the file nor its .part

    zipped = publish(arc.FILES, data, server)
    archive = server.root / "ARC-V1-Feb2018.zip"
    archive.write_bytes(archive.read_bytes()[:-100])  # cut: the zip's directory at its end is gone
    with pytest.raises(DownloadError, match="not a readable zip"):
        zipped.path("ARC-Easy-Test.jsonl", settings, lambda p: read_jsonl(p, arc.to_question))
    data["ARC-Easy-Train.jsonl"] = b'{"id": 1}\n'  # a complete archive whose file is not ARC's
    zipped = publish(arc.FILES, data, server)
    with pytest.raises(DownloadError, match="ARC-Easy-Train.jsonl in the archive is malformed .*:1: missing field"):
        zipped.path("ARC-Easy-Test.jsonl", settings, lambda p: read_jsonl(p, arc.to_question))
    assert os.listdir(tmp_path / "arc") == []  # no archive, no extracted file, no completion marker


def test_data_dir_files_are_found_flat_or_in_task_folders(tmp_path, seed):
    data = task_files(random.Random(seed))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(data["test.jsonl"])
    (tmp_path / "hellaswag_val.jsonl").write_bytes(data["hellaswag_val.jsonl"])
    settings = Settings(data_dir=str(tmp_path))
    assert gsm8k.FILES.path("test.jsonl", settings, None) == str(tmp_path / "gsm8k" / "test.jsonl")
    assert hellaswag.FILES.path("hellaswag_val.jsonl", settings, None) == str(tmp_path / "hellaswag_val.jsonl")
    with pytest.raises(FileNotFoundError, match=f"no train.jsonl in {tmp_path} or {tmp_path}/gsm8k"):
        gsm8k.FILES.path("train.jsonl", settings, None)

# ----------------------------------------------------------------------------------------------------- end to end


def run_eval(*args, check=True):
    p = subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    print(p.stdout[-3000:], p.stderr[-3000:])
    assert p.returncode == 0 or not check, p.stderr
    return p


def test_eval_end_to_end_on_a_tiny_checkpoint_over_every_task(tmp_path, seed):
    torch.manual_seed(seed)
    out = tiny_gpt2_checkpoint(tmp_path / "out")
    data = write_data_dir(tmp_path / "data", random.Random(seed), n=16)
    shakespeare = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
    subprocess.run([sys.executable, "eval_mmlu.py", f"--out_dir={out}", f"--data_dir={MMLU}", "--limit=2",
                    "--subjects=marketing"], cwd=ROOT, check=True, capture_output=True)  # joins the report card
    run_eval(f"--out_dir={out}", f"--data_dir={data}", "--tasks=all", "--limit=16", "--num_fewshot=1",
             "--max_new_tokens=4", f"--text_file={shakespeare}", "--batch_size=8", "--device=cpu")
    with open(os.path.join(out, "eval.json")) as f:
        results = json.load(f)["results"]
    assert list(results) == [n for n in TASKS if n != "arith"]  # arith, the repo's own task, is not in 'all'
    for name, r in results.items():
        assert r["n"] == 16 and len(r["records"]) == 16 and r["seconds"] > 0, name
        zero_shot = ("truthfulqa_mc1", "truthfulqa_mc2", "mmlu_cot", "humaneval", "crows_pairs", "bbq", "bpb")
        assert r["shots"] == (0 if name in zero_shot else 1)
    choice = [rec["acc"] for name in ("hellaswag", "arc_easy", "arc_challenge") for rec in results[name]["records"]]
    assert 0.04 <= sum(choice) / len(choice) <= 0.6  # random weights: near chance (1/3 to 1/5 of 48 questions)
    # 16 coin flips (gold is drawn apart from everything the model sees) leave winogrande's acc anywhere in [0, 1]
    # (15/16 happened, seed 1133392357), so check what it is made of: each pick the better-scored option
    wino = results["winogrande"]
    for rec in wino["records"]:
        assert rec["prediction"] == max(range(2), key=lambda i: rec["scores"][i])
        assert rec["acc"] == int(rec["prediction"] == rec["gold"])
    assert wino["metrics"]["acc"] == pytest.approx(sum(rec["acc"] for rec in wino["records"]) / 16)
    assert results["gsm8k"]["metrics"]["exact_match_strict"] == 0.0  # 4 tokens of noise hold no "#### n"
    m = results["bpb"]["metrics"]  # random weights: about uniform over the vocabulary, log2(50304) bits a token
    assert m["bits_per_byte"] * m["bytes"] / m["tokens"] == pytest.approx(math.log2(50304), abs=1.0)
    card = open(os.path.join(out, "eval.md")).read()
    assert "| hellaswag | acc_norm |" in card and "| bpb | bits_per_byte |" in card
    assert "| hellaswag | macro_f1_norm |" in card and "| humaneval | pass@1 | 0.0000 |" in card
    assert "| crows_pairs | pct_stereotype |" in card and "| bbq | s_amb/Age |" in card
    assert "| mmlu (test) | acc |" in card and "| mmlu (test) | rms_calibration_error |" in card


def test_eval_bad_settings_and_files_stop_with_one_line(tmp_path, monkeypatch, capsys):
    import eval as E
    for spec, message in (("hellaswag,nosuch", "unknown tasks ['nosuch']"), ("bpb", "bpb needs --text_file")):
        with pytest.raises(SystemExit):
            E.task_names(spec)
        assert message in capsys.readouterr().err
    monkeypatch.setattr(E, "text_file", "x.txt")
    assert E.task_names("all") == [n for n in TASKS if n != "arith"] and "bpb" not in E.task_names("hellaswag")
    out = tiny_gpt2_checkpoint(tmp_path / "out", block_size=32)
    for args, message in (([f"--data_dir={tmp_path}", "--tasks=gsm8k"], f"gsm8k: no test.jsonl in {tmp_path}"),
                          (["--limit=-1"], "limit must be >= 0")):
        p = run_eval(f"--out_dir={out}", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and message in lines[0], p.stderr


def fake_result(name, acc):
    return {"task": name, "shots": 0, "n": 2, "seconds": 1.0, "metrics": {"acc": acc}, "stderr": {"acc": 0.1},
            "notes": [], "records": []}


def test_the_report_card_keeps_the_latest_result_of_every_task_run_on_the_checkpoint(tmp_path, monkeypatch):
    import eval as E
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(E, "out_dir", str(run))
    at_100, at_200 = ({"iter_num": i, "model_args": {"block_size": 64}} for i in (100, 200))
    E.save({"gsm8k": fake_result("gsm8k", 0.25)}, at_100, {"tasks": "gsm8k"})
    E.save({"hellaswag": fake_result("hellaswag", 0.5)}, at_100, {"tasks": "hellaswag"})
    saved = json.loads((run / "eval.json").read_text())["results"]
    assert list(saved) == ["hellaswag", "gsm8k"]  # in the order of TASKS
    assert saved["gsm8k"]["settings"] == {"tasks": "gsm8k"} and saved["gsm8k"]["iter_num"] == 100
    assert saved["gsm8k"]["date"] and saved["gsm8k"]["model"] == str(run)
    card = (run / "eval.md").read_text()
    assert "| hellaswag | acc | 0.5000 | 0.1000 | 0 | 2 | 1.0 | 100 |" in card and "| gsm8k | acc | 0.2500 |" in card
    E.save({"gsm8k": fake_result("gsm8k", 0.75)}, at_100, {"tasks": "gsm8k"})  # a rerun replaces its own task
    card = (run / "eval.md").read_text()
    assert "| gsm8k | acc | 0.7500 |" in card and "0.2500" not in card and "| hellaswag | acc | 0.5000 |" in card
    assert "measured at iter" not in card
    E.save({"hellaswag": fake_result("hellaswag", 0.625)}, at_200, {"tasks": "hellaswag"})  # the run trained on
    card = (run / "eval.md").read_text()
    assert "| gsm8k | acc | 0.7500 | 0.1000 | 0 | 2 | 1.0 | 100 |" in card  # kept, and marked:
    assert "- gsm8k: measured at iter 100, the checkpoint is now at iter 200: rerun it to refresh" in card
    assert "| hellaswag | acc | 0.6250 | 0.1000 | 0 | 2 | 1.0 | 200 |" in card and "hellaswag: measured" not in card


def test_a_damaged_mmlu_json_or_eval_json_is_reported_and_the_other_results_kept(tmp_path, monkeypatch, capsys):
    import eval as E
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(E, "out_dir", str(run))
    ckpt = {"iter_num": 7, "model_args": {"block_size": 64}}
    mmlu = {"split": "test", "ntrain": 5, "n": 4, "wall_s": 2.0, "accuracy": 0.25, "macro_accuracy": 0.5,
            "iter_num": 7, "date": "2026-01-02 03:04"}
    (run / "mmlu.json").write_text(json.dumps(mmlu, indent=1))
    E.save({"gsm8k": fake_result("gsm8k", 0.25)}, ckpt, {})
    card = (run / "eval.md").read_text()
    stderr = (0.25 * 0.75 / 3) ** 0.5  # the standard error of four 0/1 values with mean 1/4
    assert f"| mmlu (test) | acc | 0.2500 | {stderr:.4f} | 5 | 4 | 2.0 | 7 | 2026-01-02 03:04 |" in card
    (run / "mmlu.json").write_text(json.dumps(mmlu, indent=1)[:50])  # cut mid-write
    E.save({"hellaswag": fake_result("hellaswag", 0.5)}, ckpt, {})
    assert f"warning: {run / 'mmlu.json'} is damaged" in capsys.readouterr().out
    card = (run / "eval.md").read_text()
    assert "| mmlu (test)" not in card and "| gsm8k | acc | 0.2500 |" in card and "| hellaswag | acc | 0.5000 |" in card
    damaged = (run / "eval.json").read_text()[:100]
    (run / "eval.json").write_text(damaged)
    E.save({"winogrande": fake_result("winogrande", 0.5)}, ckpt, {})
    assert f"moved to {run / 'eval.json'}.damaged" in capsys.readouterr().out
    assert (run / "eval.json.damaged").read_text() == damaged
    assert list(json.loads((run / "eval.json").read_text())["results"]) == ["winogrande"]
