"""nanogpt/interp.py against TransformerLens (test-only): one tiny random model of ours with sliding-window and global
layers, GQA and QK-norm, exported to Hugging Face's Qwen3 layout (tools/export_hf.py), loaded by transformers from the
folder (never a hub) and wrapped in TransformerLens's TransformerBridge; the attention patterns, each head's output
and the logit lens (TransformerLens's own final norm and unembedding on its own cached residuals) agree within
float32 tolerance."""
import pytest
import torch
from test_hf import EAGER, our_checkpoint, tiny_config
from test_interp import CHARS, SPEC

from nanogpt import interp

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
bridge_module = pytest.importorskip("transformer_lens.model_bridge")
from tools import export_hf  # (after the skips: it needs safetensors)


def test_patterns_head_outputs_and_logit_lens_agree_with_transformer_lens(tmp_path, seed):
    cfg = tiny_config(attn_pattern="LLG", local_window=6, head_dim=12, n_kv_head=2, norm_eps=1e-5,
                      vocab_size=len(CHARS))
    ours, ckpt = our_checkpoint(cfg, SPEC)
    assert export_hf.export(ckpt, str(tmp_path / "hf")) == "qwen3"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **EAGER).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bridge = bridge_module.TransformerBridge.boot_transformers(str(tmp_path / "hf"), hf_model=hf_model,
                                                               tokenizer=tokenizer)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))  # longer than the window of 6
    L = cfg.n_layer
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(idx)
        logits, cache = interp.run_with_cache(ours, idx, [f"blocks.{i}.attn.{p}" for i in range(L)
                                                          for p in ("pattern", "z")])
        tl_lens = torch.stack([bridge.unembed(bridge.ln_final(tl_cache[name])) for name in
                               ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]])
    tolerance = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, tl_logits, **tolerance)
    for i in range(L):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.pattern"], tl_cache[f"blocks.{i}.attn.hook_pattern"],
                                   **tolerance)
        z = tl_cache[f"blocks.{i}.attn.hook_z"]   # (B, T, H, D) or flattened heads (B, T, H * D)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.z"].transpose(1, 2).reshape(z.shape), z, **tolerance)
    assert (cache["blocks.0.attn.pattern"][:, :, 10, :5] == 0).all()  # the local layer's window, in both
    torch.testing.assert_close(interp.logit_lens(ours, idx), tl_lens, **tolerance)
