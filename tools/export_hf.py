"""Export a checkpoint as a Hugging Face model folder that transformers loads with
AutoModelForCausalLM.from_pretrained and that computes the same logits.

    python tools/export_hf.py --out_dir=out --hf_dir=hf-out

Writes config.json, model.safetensors (the weights as stored, float32) and the tokenizer files: GPT-2's vocab.json
and merges.txt (rebuilt offline from tiktoken), a tokenizer.json for a character vocabulary (needs the tokenizers
package) or the imported one for a model that came from Hugging Face. Each configuration goes to the standard
architecture that computes exactly our function:

    dense, no QK-norm, global attention only     -> Llama
    dense, no QK-norm, sliding-window layers      -> Qwen2 (its q/k/v biases written as zeros)
    dense, QK-norm                                -> Qwen3 (sliding-window layers through layer_types)
    MoE, QK-norm                                  -> dots.llm1 (Dots1: Qwen3 attention, DeepSeek-V3 routing)
    MoE, no QK-norm, global attention only        -> GLM-4-MoE (full rotary, no biases)
    MLA (kv_lora_rank > 0), global attention only -> DeepSeek-V3 (dense or MoE; its interleaved rope layout)

Anything else (ReLU² MLP, cross-layer KV sharing, a logit soft-cap, ...) is refused with the settings that block
it, and nothing is written: an approximate export never exists.

hf_dir must be a new folder, or with --overwrite=True one that holds an earlier export only (the files listed in
EXPORT_FILES). A file, the current folder or one above it, the run being exported, or a folder holding anything
else (a checkpoint, say) is refused before anything is written: an export never deletes what it did not write.
"""
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import configure, require  # noqa: E402
from model import GPTConfig, layer_plan  # noqa: E402
from nanogpt import hf  # noqa: E402
from nanogpt.checkpoint import architecture, clean_state_dict, read_checkpoint, results_dir  # noqa: E402
from nanogpt.files import write_atomic  # noqa: E402

out_dir = "out"                # the run to export: out_dir/ckpt.pt or its newest step_N/ (or a ckpt.pt path)
hf_dir = "hf-out"              # the Hugging Face folder to write
overwrite = False              # replace hf_dir if it holds an earlier export (and nothing else)

EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
                "tokenizer_config.json"}  # everything an export writes

# GPTConfig fields the mapping below accounts for: any other one set away from its default is refused, so a feature
# added to model.py later is never exported as if it were not there
MAPPED_FIELDS = {"block_size", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp",
                 "mlp_hidden", "qk_norm", "tie_embeddings", "dropout", "rope_theta", "attn_pattern", "local_window",
                 "kv_share", "share_global_kv", "n_expert", "n_expert_active", "n_shared_expert", "moe_hidden",
                 "n_dense_layers", "moe_bias_gamma", "moe_aux_alpha", "norm_eps", "logit_softcap", "zero_init_proj",
                 "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}

# ---------------------------------------------------------------------------------------------------- mapping


def refusals(cfg):
    """Why cfg has no exact standard counterpart: one line per blocking setting (empty: exportable)."""
    defaults = asdict(GPTConfig())
    reasons = [f"{name}={value!r}: no mapping for this setting" for name, value in asdict(cfg).items()
               if name not in MAPPED_FIELDS and value != defaults[name]]
    if cfg.mlp != "swiglu":
        reasons.append(f"mlp={cfg.mlp!r}: every standard architecture here has a SwiGLU MLP (ReLU² has none)")
    if cfg.logit_softcap:
        reasons.append(f"logit_softcap={cfg.logit_softcap}: none of these architectures caps its logits")
    if not all(produces for _, _, produces in layer_plan(cfg)):
        reasons.append(f"kv_share={cfg.kv_share}, share_global_kv={cfg.share_global_kv}: layers that reuse another "
                       "layer's K/V (cross-layer sharing) exist in no standard architecture")
    if cfg.n_expert and cfg.n_expert < 2:
        reasons.append(f"n_expert={cfg.n_expert}: Dots1 and GLM-4-MoE route among at least 2 experts")
    if cfg.mla and "L" in cfg.attn_pattern:
        reasons.append(f"kv_lora_rank={cfg.kv_lora_rank} with attn_pattern={cfg.attn_pattern!r}: DeepSeek-V3 (the "
                       "standard MLA architecture) has no sliding windows")
    elif cfg.n_expert and not cfg.qk_norm and "L" in cfg.attn_pattern:
        reasons.append(f"n_expert={cfg.n_expert} with qk_norm=False and attn_pattern={cfg.attn_pattern!r}: "
                       "GLM-4-MoE has no sliding windows (Dots1, which has, always has QK-norm)")
    return reasons


def model_type(cfg):
    if cfg.mla:
        return "deepseek_v3"
    if cfg.n_expert:
        return "dots1" if cfg.qk_norm else "glm4_moe"
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if "L" in cfg.attn_pattern else "llama"


def window_fields(cfg, kind):
    """The sliding-window fields of config.json: layer_types name each layer's kind (the pattern tiled)."""
    kinds = [cfg.attn_pattern[i % len(cfg.attn_pattern)] for i in range(cfg.n_layer)]
    if kind in ("llama", "glm4_moe"):
        return {}
    sliding = "L" in kinds
    fields = {"sliding_window": cfg.local_window if sliding else None, "max_window_layers": cfg.n_layer,
              "layer_types": ["sliding_attention" if k == "L" else "full_attention" for k in kinds]}
    return dict(fields, use_sliding_window=sliding) if kind in ("qwen2", "qwen3") else fields


def moe_fields(cfg, kind):
    if not cfg.n_expert:
        return {}
    fields = {"n_routed_experts": cfg.n_expert, "num_experts_per_tok": cfg.n_expert_active,
              "n_shared_experts": cfg.n_shared_expert, "moe_intermediate_size": cfg.expert_hidden,
              "first_k_dense_replace": cfg.n_dense_layers, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
              "routed_scaling_factor": 1.0}
    return dict(fields, use_qk_norm=cfg.qk_norm) if kind == "glm4_moe" else fields


def deepseek_fields(cfg):
    """DeepSeek-V3's MLA and MoE fields: a dense model is one whose dense layers are all of them; routing among all
    experts (one group); the rope rows written in DeepSeek's interleaved layout; no multi-token-prediction layer."""
    moe = moe_fields(cfg, "deepseek_v3") or {"n_routed_experts": 2, "num_experts_per_tok": 1, "n_shared_experts": 1,
                                              "moe_intermediate_size": 1, "first_k_dense_replace": cfg.n_layer,
                                              "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
                                              "routed_scaling_factor": 1.0}
    return dict(moe, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim, rope_interleave=True,
                num_nextn_predict_layers=0)


def hf_config(cfg, eot):
    """config.json for cfg. rope_parameters is transformers v5's field; rope_theta (and partial_rotary_factor)
    keep v4 readers right."""
    kind = model_type(cfg)
    if kind == "deepseek_v3":
        return dict(hf_config(dataclasses.replace(cfg, kv_lora_rank=0, q_lora_rank=0, qk_nope_head_dim=0,
                                                  qk_rope_head_dim=0, v_head_dim=0, n_expert=0), eot),
                    architectures=[hf.CAUSAL_LM_CLASS[kind]], model_type=kind, **deepseek_fields(cfg))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    full_rotary = {"partial_rotary_factor": 1.0} if kind == "glm4_moe" else {}  # GLM's default rotates half
    rope.update(full_rotary)
    return {"architectures": [hf.CAUSAL_LM_CLASS[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope, "rope_theta": cfg.rope_theta, **full_rotary,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32", "use_cache": True,
            **window_fields(cfg, kind), **moe_fields(cfg, kind)}


def hf_tensors(state, cfg):
    """Our state_dict under Hugging Face names, each tensor its own contiguous copy (safetensors stores no views)."""
    out = {}
    for name in hf.state_shapes(cfg):
        tensor = state[name]
        if hf.is_expert_weight(name):
            out.update(hf.expert_tensors(name, tensor))
        elif not (name == "lm_head.weight" and cfg.tie_embeddings):  # a tied head is the embedding
            out[hf.hf_name(name)] = tensor
    if cfg.n_expert and not cfg.n_shared_expert:  # Dots1 and GLM-4-MoE always build shared experts: zero-width ones
        shapes = {"gate_proj": (0, cfg.n_embd), "up_proj": (0, cfg.n_embd), "down_proj": (cfg.n_embd, 0)}
        for i in range(cfg.n_dense_layers, cfg.n_layer):
            out.update({f"model.layers.{i}.mlp.shared_experts.{p}.weight": torch.zeros(s) for p, s in shapes.items()})
    if model_type(cfg) == "deepseek_v3":
        out = {name: hf.interleaved_rope_rows(name, t, cfg, to_ours=False) for name, t in out.items()}
    if model_type(cfg) == "qwen2":  # Qwen2's q/k/v always carry biases: zeros compute our function
        for i in range(cfg.n_layer):
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = out[f"model.layers.{i}.self_attn.{proj}.weight"]
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = weight.new_zeros(weight.size(0))
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}

# -------------------------------------------------------------------------------------------------- tokenizers


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def write_tokenizer(spec, folder, block_size):
    """The tokenizer files transformers' AutoTokenizer reads; returns the end-of-text id (or None)."""
    if spec["kind"] == "gpt2":
        vocab, merges = hf.gpt2_vocab_and_merges()
        special = spec.get("special", {})  # e.g. the chat markers, at the ids after GPT-2's
        write_json(os.path.join(folder, "vocab.json"), {**vocab, **special})
        write_atomic(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
        eot = "<|endoftext|>"
        write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
            "add_prefix_space": False, "additional_special_tokens": sorted(special, key=special.get),
            "model_max_length": block_size})
        return vocab[eot]
    write_atomic(os.path.join(folder, "tokenizer.json"),
                 hf.char_tokenizer_json(spec["chars"]) if spec["kind"] == "char" else spec["json"])
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size})
    return spec.get("eot")

# ------------------------------------------------------------------------------------------------------- export


def inside(path, folder):
    """Whether path is folder or lies under it (both resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def hf_dir_problem(folder, source, overwrite):
    """Why `folder` must not become the export of `source` (one line), or None: see the module docstring."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"--hf_dir={folder} is a file: name a new folder"
    if inside(os.getcwd(), folder):
        return f"--hf_dir={folder} is the current folder or holds it: name a new folder"
    if inside(results_dir(source), folder):
        return f"--hf_dir={folder} holds the run being exported ({source}): name a new folder"
    found = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if found - EXPORT_FILES:
        others = ", ".join(sorted(found - EXPORT_FILES)[:3])
        return f"--hf_dir={folder} holds files an export does not write ({others}): name a new folder"
    if found and not overwrite:
        return f"--hf_dir={folder} holds an earlier export: pass --overwrite=True to replace it, or another --hf_dir"
    return None


def export(ckpt, folder):
    """Write ckpt (a checkpoint dict) to folder as a Hugging Face model (into a temp folder beside it, then renamed
    over it); ValueError naming the blocking settings when no standard architecture computes it exactly, and then
    nothing is written. A folder already there is replaced only when it holds export files alone. Returns the
    architecture's model_type."""
    from safetensors.torch import save_file
    # MTP modules only train (and draft): dropped, as DeepSeek-V3's Hugging Face model drops its own
    cfg = replace(GPTConfig(**architecture(ckpt)), mtp_depth=0)
    reasons = refusals(cfg)
    if reasons:
        raise ValueError("no exact Hugging Face counterpart: " + "; ".join(reasons))
    if os.path.isdir(folder) and set(os.listdir(folder)) - EXPORT_FILES:
        raise ValueError(f"{folder} holds files an export does not write: not replaced")
    state = {k: v for k, v in clean_state_dict(ckpt["model"]).items() if not k.startswith("mtp.")}
    tensors = hf_tensors(state, cfg)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(folder))}.", dir=parent)
    try:
        eot = write_tokenizer(ckpt.get("tokenizer", {"kind": "gpt2"}), tmp, cfg.block_size)
        write_json(os.path.join(tmp, "config.json"), hf_config(cfg, eot))
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_type(cfg)


def main():
    configure(globals())
    problem = hf_dir_problem(hf_dir, out_dir, overwrite)
    require(problem is None, problem)
    try:
        kind = export(read_checkpoint(out_dir), hf_dir)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(str(e))
    print(f"wrote {hf_dir} ({kind}): {', '.join(sorted(os.listdir(hf_dir)))}")


if __name__ == "__main__":
    main()
