"""Hugging Face import (nanogpt/hf.py) and export (tools/export_hf.py) against transformers itself: tiny random models
built locally (never downloaded), logits compared in float32 on random tokens, exact round trips, and the refusals."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanogpt.checkpoint import read_checkpoint_file
from tests.conftest import ROOT, SHARED, TINY, run_script

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from nanogpt import hf  # noqa: E402
from tools import export_hf  # noqa: E402  (after the skips: both need safetensors)

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
           norm_topk_prob=True, routed_scaling_factor=1.5)
HF_MODELS = {  # each supported layout with the features it can carry; windows shorter than the 24 test tokens
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=5000.0)),
    "mistral": ("MistralConfig", dict(sliding_window=7, head_dim=12)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  use_sliding_window=True, sliding_window=5, num_key_value_heads=1)),
    "dots1": ("Dots1Config", dict(MOE, first_k_dense_replace=1, sliding_window=9, max_window_layers=2)),
    "glm4_moe": ("Glm4MoeConfig", dict(MOE, first_k_dense_replace=0, use_qk_norm=True, partial_rotary_factor=1.0,
                                       n_shared_experts=2)),
}
OURS = {  # our configurations, each exported to the architecture named
    "llama": dict(qk_norm=False, n_kv_head=2),
    "qwen2": dict(qk_norm=False, attn_pattern="LG", local_window=5, tie_embeddings=True),
    "qwen3": dict(attn_pattern="LLG", local_window=6, head_dim=12, n_kv_head=1, norm_eps=1e-5, rope_theta=500.0),
    "dots1": dict(n_expert=4, n_expert_active=2, n_dense_layers=1, n_shared_expert=0, attn_pattern="GL",
                  local_window=7),
    "glm4_moe": dict(qk_norm=False, n_expert=4, n_expert_active=3, n_dense_layers=0, n_shared_expert=2),
}
EAGER = dict(attn_implementation="eager", experts_implementation="eager")  # transformers' plain loops as reference
CHARS = "".join(chr(ord("!") + i) for i in range(61))


def tiny_config(**overrides):
    return GPTConfig(**dict(dict(block_size=64, vocab_size=61, n_layer=3, n_embd=32, n_head=4, mlp="swiglu"),
                            **overrides))


@torch.no_grad()
def randomize(module):
    """Norm weights and router biases away from their 1 / 0 initial values, so a misplaced one shows."""
    for name, tensor in module.state_dict().items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor.uniform_(0.5, 1.5)
        elif name.endswith("e_score_correction_bias") or name.endswith("mlp.bias"):
            tensor.normal_(0, 0.1)


def our_checkpoint(cfg, tokenizer=None):
    model = GPT(cfg).eval()
    randomize(model)
    return model, {"model": model.state_dict(), "model_args": asdict(cfg),
                   "tokenizer": tokenizer or {"kind": "char", "chars": CHARS}}


def transformers_model(kind, folder, shard=False, **overrides):
    """A random tiny transformers model of `kind`, saved to folder with our character tokenizer."""
    name, extra = HF_MODELS[kind]
    config = getattr(transformers, name)(**dict(SMALL, **extra, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(config, **EAGER).eval()
    randomize(model)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(hf.char_tokenizer_json(CHARS))
    return model


def max_logit_difference(ours, theirs, vocab_size):
    tokens = torch.randint(0, vocab_size, (2, 24))
    with torch.no_grad():
        return (ours.logits(ours(tokens)) - theirs(tokens).logits).abs().max().item()


def resolved(args):
    """model_args with the widths their 0 defaults stand for, and the window only where a layer uses it."""
    cfg = GPTConfig(**args)
    out = dict(asdict(cfg), mlp_hidden=cfg.hidden, moe_hidden=cfg.expert_hidden if cfg.n_expert else 0)
    return dict(out, local_window=out["local_window"] if "L" in cfg.attn_pattern else None)


@pytest.mark.parametrize("kind", HF_MODELS)
def test_import_computes_the_transformers_model(tmp_path, seed, kind):
    theirs = transformers_model(kind, tmp_path, shard=kind == "llama")
    assert (kind != "llama") or os.path.exists(tmp_path / "model.safetensors.index.json")
    ckpt = hf.read_hf_checkpoint(str(tmp_path))
    ours = GPT(GPTConfig(**ckpt["model_args"])).eval()
    ours.load_state_dict(ckpt["model"])
    assert max_logit_difference(ours, theirs, SMALL["vocab_size"]) <= 1e-5
    assert ckpt["tokenizer"] == {"kind": "char", "chars": CHARS}


@pytest.mark.parametrize("kind", OURS)
def test_export_loads_in_transformers_and_round_trips(tmp_path, seed, kind):
    cfg = tiny_config(**OURS[kind])
    ours, ckpt = our_checkpoint(cfg)
    assert export_hf.export(ckpt, str(tmp_path / "hf")) == kind
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **EAGER).eval()
    assert max_logit_difference(ours, theirs, cfg.vocab_size) <= 1e-5
    back = hf.read_hf_checkpoint(str(tmp_path / "hf"))
    assert back["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in ckpt["model"].items())
    assert resolved(back["model_args"]) == resolved(ckpt["model_args"]) and back["tokenizer"] == ckpt["tokenizer"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "".join(CHARS[i] for i in torch.randint(0, len(CHARS), (50,)))
    assert tokenizer.encode(text, add_special_tokens=False) == [CHARS.index(c) for c in text]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_export_drops_the_mtp_modules_and_keeps_the_logits(tmp_path, seed):
    cfg = tiny_config(mtp_depth=2)
    ours, ckpt = our_checkpoint(cfg)
    export_hf.export(ckpt, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **EAGER).eval()
    assert max_logit_difference(ours, theirs, cfg.vocab_size) <= 1e-5


@pytest.mark.parametrize("overrides, named", [
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(logit_softcap=30.0), "logit_softcap=30.0"),
    (dict(attn_pattern="LLGG", local_window=8, kv_share=2, n_layer=4), "kv_share=2"),
    (dict(share_global_kv=True, n_layer=2), "share_global_kv=True"),
    (dict(qk_norm=False, n_expert=4, attn_pattern="LG"), "qk_norm=False"),
    (dict(value_embeds=1), "value_embeds=1"),
    (dict(memory_layers=(1,), memory_keys=4, memory_topk=2), "memory_layers=(1,)"),
])
def test_export_refuses_what_has_no_exact_counterpart(tmp_path, overrides, named):
    _, ckpt = our_checkpoint(tiny_config(**overrides))
    with pytest.raises(ValueError, match="no exact Hugging Face counterpart") as error:
        export_hf.export(ckpt, str(tmp_path / "hf"))
    assert named in str(error.value) and not os.listdir(tmp_path)


@pytest.mark.parametrize("kind, change, reason", [
    ("qwen2", "bias", "is not zero"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope scaling"),
    ("llama", {"hidden_act": "gelu"}, "SwiGLU"),
    ("llama", {"model_type": "qwen3_moe"}, "supported are"),
    ("dots1", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("dots1", {"n_group": 2, "topk_group": 1}, "group-limited"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
])
def test_import_refuses_what_we_cannot_compute(tmp_path, seed, kind, change, reason):
    transformers_model(kind, tmp_path)
    if change == "bias":
        from safetensors.torch import load_file, save_file
        tensors = load_file(tmp_path / "model.safetensors")
        tensors["model.layers.1.self_attn.k_proj.bias"].normal_()
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(ValueError, match=reason):
        hf.read_hf_checkpoint(str(tmp_path))


@pytest.mark.parametrize("chat", [False, True])
def test_gpt2_tokenizer_files_encode_like_tiktoken(tmp_path, seed, chat):
    from nanogpt.tokenizer import Tokenizer, chat_spec, model_vocab_size
    spec = chat_spec() if chat else {"kind": "gpt2"}
    ours = Tokenizer(spec)
    _, ckpt = our_checkpoint(tiny_config(vocab_size=model_vocab_size(ours), n_embd=16, n_layer=1), spec)
    export_hf.export(ckpt, str(tmp_path))
    shakespeare = open(os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")).read()
    start = torch.randint(0, len(shakespeare) - 3000, ()).item()
    pieces = ["héllo wörld", "日本語", " 🎉  \n\n  x", "<|endoftext|>", "  trailing  ", "1234567 don't",
              *spec.get("special", {})]
    text = shakespeare[start:start + 3000] + "".join(pieces[i] for i in torch.randint(0, len(pieces), (40,)))
    expected = ours.encode(text)
    for tokenizer in (transformers.GPT2TokenizerFast.from_pretrained(tmp_path),
                      transformers.AutoTokenizer.from_pretrained(tmp_path)):
        assert tokenizer.encode(text) == expected and tokenizer.decode(expected) == text
        assert tokenizer.eos_token_id == ours.eot
    assert hf.read_hf_checkpoint(str(tmp_path))["tokenizer"] == spec


def test_other_vocabularies_run_through_the_tokenizers_wrapper(tmp_path, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    corpus = [" ".join(words[i] for i in torch.randint(0, len(words), (12,))) for _ in range(50)]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers_model("qwen3", tmp_path, vocab_size=bpe.get_vocab_size())
    bpe.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, eos_token_id=1)))
    spec = hf.read_hf_checkpoint(str(tmp_path))["tokenizer"]
    assert spec["kind"] == "hf" and spec["eot"] == 1
    ours, theirs = hf.HFTokenizer(spec), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = corpus[0] + " </s> " + corpus[1]
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text == theirs.decode(ours.encode(text))
    assert ours.encode_ordinary("a </s>") != ours.encode("a </s>") and 1 not in ours.encode_ordinary("a </s>")
    assert ours.vocab_size == bpe.get_vocab_size()


def test_export_command(tmp_path, seed):
    from nanogpt.checkpoint import save_checkpoint
    for name, overrides in (("ok", OURS["qwen3"]), ("relu2", dict(mlp="relu2"))):
        os.makedirs(tmp_path / name)
        save_checkpoint(our_checkpoint(tiny_config(**overrides))[1], str(tmp_path / name / "ckpt.pt"))
    ok, hf_dir = f"--out_dir={tmp_path / 'ok'}", f"--hf_dir={tmp_path / 'hf'}"
    result = run_script("tools/export_hf.py", ok, hf_dir)
    assert "(qwen3)" in result.stdout and (tmp_path / "hf" / "model.safetensors").exists()
    again = run_script("tools/export_hf.py", ok, hf_dir, check=False)
    assert again.returncode != 0 and "--overwrite=True" in again.stderr
    replaced = run_script("tools/export_hf.py", ok, hf_dir, "--overwrite=True")  # an earlier export alone: replaced
    assert "(qwen3)" in replaced.stdout and sorted(os.listdir(tmp_path)) == ["hf", "ok", "relu2"]  # no temp folder left
    refused = run_script("tools/export_hf.py", f"--out_dir={tmp_path / 'relu2'}", f"--hf_dir={tmp_path / 'no'}",
                         check=False)
    assert refused.returncode != 0 and "mlp='relu2'" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_train_and_sample_take_a_hugging_face_folder(tmp_path, data_root):
    from nanogpt.tokenizer import dataset_spec
    spec = dataset_spec(os.path.join(data_root, "shakespeare_char"))
    cfg = GPTConfig(block_size=32, vocab_size=len(spec["chars"]), n_layer=2, n_embd=32, n_head=2, mlp="swiglu")
    checkpoint = {"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "tokenizer": spec}
    export_hf.export(checkpoint, str(tmp_path / "hf"))
    sample = run_script("sample.py", f"--out_dir=hf:{tmp_path / 'hf'}", "--start=ROMEO:", "--num_samples=1",
                        "--max_new_tokens=10", "--device=cpu")
    assert sample.stdout.startswith("ROMEO:")
    out = str(tmp_path / "out")  # the architecture comes from the folder (its SwiGLU MLP, not train.py's ReLU^2)
    run_script("train.py", *TINY, f"--data_root={data_root}", "--max_iters=2", "--eval_interval=2",
               f"--out_dir={out}", f"--init_from=hf:{tmp_path / 'hf'}")
    assert read_checkpoint_file(os.path.join(out, "ckpt.pt"))["model_args"]["mlp"] == "swiglu"
    refused = run_script("train.py", *TINY, "--n_layer=6", f"--data_root={data_root}", f"--out_dir={out}-6",
                         f"--init_from=hf:{tmp_path / 'hf'}", check=False)  # a setting that contradicts the folder
    assert refused.returncode != 0 and "'n_layer': (2, 6)" in refused.stderr and "Traceback" not in refused.stderr


def test_transformers_model_classes_import_from_the_repo_root():
    """transformers (5.25) imports the PyPI package `kernels` when it is importable: a `kernels/` folder in the repo
    root, first on sys.path when a command runs there, would shadow it and break the import. Ours is nanokernels/."""
    code = ("import torch\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
            "                     num_attention_heads=2, num_key_value_heads=2)\n"
            "print(tuple(LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits.shape))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(1, 3, 32)"
