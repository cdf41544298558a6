"""Hugging Face models in: a local folder in the Llama, Mistral, Qwen2, Qwen3, dots.llm1 (`dots1`), GLM-4-MoE
(`glm4_moe`) or DeepSeek-V3 (`deepseek_v3`: multi-head latent attention) layout becomes this repo's checkpoint dict, for init_from='hf:PATH', sample.py and the eval scripts.

    ckpt = hf.read_hf_checkpoint("path/to/folder")  # {"model": state_dict, "model_args": ..., "tokenizer": spec}

The folder holds config.json, the weights as safetensors (model.safetensors, or shards listed in
model.safetensors.index.json; pickled pytorch_model.bin files are refused: loading them can run code) and a
tokenizer (tokenizer.json, or GPT-2's vocab.json + merges.txt). Nothing is downloaded. A model is imported only if
this repo's model.py computes exactly its function; anything else is refused with the reason: biases that are not
zero, rope scaling or partial rotary embeddings, another activation, group-limited or unnormalised MoE routing,
layer kinds other than full and sliding attention. Weights become float32 (the training master copy).

This module also holds what tools/export_hf.py needs in the other direction: the parameter names, the expert layout and
GPT-2's tokenizer files, rebuilt offline from tiktoken's ranks. The tokenizer of a non-GPT-2 model is kept whole in
the checkpoint's spec ({"kind": "hf", "json": <tokenizer.json text>, ...}) and run by HFTokenizer below with the
`tokenizers` package (an optional dependency, needed only for such models).
"""
import functools
import json
import os
import re
from dataclasses import asdict

import torch

from model import GPT, GPTConfig
from nanogpt.files import FileFormatError, read_text

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "dots1", "glm4_moe", "deepseek_v3")
MOE_ARCHITECTURES = ("dots1", "glm4_moe", "deepseek_v3")
CAUSAL_LM_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM", "dots1": "Dots1ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                   "deepseek_v3": "DeepseekV3ForCausalLM"}
# What transformers' config classes (v5) assume for a config.json field that a file leaves out (older versions save
# only the fields that differ from these); None: hidden_size // num_attention_heads for head_dim, n_head for n_kv_head
COMMON_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
                   "head_dim": None, "num_key_value_heads": None, "max_position_embeddings": 2048}
DEFAULTS = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 131072},
    "qwen2": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "max_position_embeddings": 32768},
    "qwen3": {"head_dim": 128, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "max_position_embeddings": 32768},
    "dots1": {"sliding_window": 4096, "max_window_layers": 62, "norm_topk_prob": False, "n_group": 1,
              "topk_group": 1, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0},
    "glm4_moe": {"rms_norm_eps": 1e-5, "partial_rotary_factor": 0.5, "use_qk_norm": False, "norm_topk_prob": True,
                 "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                 "routed_scaling_factor": 1.0, "max_position_embeddings": 131072},
    "deepseek_v3": {"n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True,
                    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "max_position_embeddings": 4096,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "qk_nope_head_dim": 128, "rope_interleave": True},
}


class Unsupported(ValueError):
    """A model or setting with no exact counterpart on the other side; the message names what blocks it."""


# ----------------------------------------------------------------------------------------------- parameter names
# One table, our name -> Hugging Face name, used in both directions. The routed experts (w_up, w_down: stacked here,
# one module per expert there) are converted by expert_tensors / stacked_experts.
HF_NAMES = [
    (r"wte\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.(\w+)\.weight", r"model.layers.\1.self_attn.\2.weight"),
    (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
    (r"blocks\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.mlp.gate.weight"),
    (r"blocks\.(\d+)\.mlp\.bias", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"blocks\.(\d+)\.mlp\.shared\.(\w+)\.weight", r"model.layers.\1.mlp.shared_experts.\2.weight"),
]


def hf_name(name):
    for ours, theirs in HF_NAMES:
        if re.fullmatch(ours, name):
            return re.sub(ours, theirs, name)
    raise KeyError(f"no Hugging Face name for {name}")


def is_expert_weight(name):
    return name.endswith(".mlp.w_up") or name.endswith(".mlp.w_down")


def expert_tensors(name, tensor):
    """Our stacked w_up (E, 2h, d: gate rows, then up rows) or w_down (E, d, h) as one tensor per expert."""
    prefix = "model.layers." + name.split(".")[1] + ".mlp.experts"
    out = {}
    for e, weight in enumerate(tensor):
        if name.endswith("w_up"):
            gate, up = weight.chunk(2)
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        else:
            out[f"{prefix}.{e}.down_proj.weight"] = weight
    return out


def stacked_experts(name, n_expert, tensors):
    """The inverse of expert_tensors: w_up or w_down from a folder's per-expert tensors."""
    prefix = "model.layers." + name.split(".")[1] + ".mlp.experts"
    if name.endswith("w_up"):
        return torch.stack([torch.cat([tensors[f"{prefix}.{e}.{proj}.weight"] for proj in ("gate_proj", "up_proj")])
                            for e in range(n_expert)])
    return torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(n_expert)])


def interleaved_rope_rows(name, tensor, cfg, to_ours):
    """DeepSeek's checkpoints (rope_interleave) rotate the rope dims as adjacent pairs (x0, x1), (x2, x3), ... and
    return them evens first, odds after; ours rotates (x_i, x_i+rope/2). The same function once the rope rows of the
    query and rope-key projections are reordered evens-then-odds: `to_ours` does that, else the inverse. Other
    tensors pass through."""
    rope = cfg.qk_rope_head_dim
    evens_then_odds = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
    order = evens_then_odds if to_ours else evens_then_odds.argsort()
    if name.endswith(("attn.q_proj.weight", "attn.q_b_proj.weight")):
        heads = tensor.view(cfg.n_head, cfg.qk_nope_head_dim + rope, -1)
        nope, rot = heads.split([cfg.qk_nope_head_dim, rope], dim=1)
        return torch.cat((nope, rot[:, order]), dim=1).reshape(tensor.shape)
    if name.endswith("attn.kv_a_proj_with_mqa.weight"):
        latent, rot = tensor.split([cfg.kv_lora_rank, rope])
        return torch.cat((latent, rot[order]))
    return tensor


def state_shapes(cfg):
    """Our state_dict names and shapes for cfg, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(cfg).state_dict().items()}


# ------------------------------------------------------------------------------------------- GPT-2 tokenizer files

def bytes_to_unicode():
    """GPT-2's byte -> printable character map (encoder.py of openai/gpt-2): printable Latin-1 bytes map to
    themselves, the other 68 to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def merge_parts(ranks, token):
    """The two tokens BPE merges into `token`: byte-level BPE on its bytes, using only merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                      if ranks.get(a + b, len(ranks)) < ranks[token]]
        i = min(candidates)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def gpt2_vocab_and_merges():
    """GPT-2's vocab.json dict and merges.txt lines, rebuilt from tiktoken's cached ranks (offline: tiktoken reads
    TIKTOKEN_CACHE_DIR). A few seconds, once per process."""
    import tiktoken
    encoding = tiktoken.get_encoding("gpt2")
    ranks, to_char = encoding._mergeable_ranks, bytes_to_unicode()

    def text(token):
        return "".join(to_char[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(encoding._special_tokens)
    merges = [" ".join(map(text, merge_parts(ranks, token)))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges


def char_tokenizer_json(chars):
    """A `tokenizers` tokenizer.json for a character vocabulary: one token per character, decoded by joining."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m): '.' matches \n too
    tokenizer.decoder = decoders.Fuse()
    return tokenizer.to_str()


# --------------------------------------------------------------------------------------------------- tokenizers

class HFTokenizer:
    """A Hugging Face `tokenizers` vocabulary with tokenizer.Tokenizer's interface (encode, decode, vocab_size,
    eot, spec) for a spec {"kind": "hf", "name": ..., "json": <tokenizer.json text>, "eot": id or None}."""

    def __init__(self, spec):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ValueError(f"the {spec['name']} tokenizer needs the tokenizers package: "
                             "pip install tokenizers") from e
        self.spec, self.tokenizer, self.eot = spec, Tokenizer.from_str(spec["json"]), spec.get("eot")
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text):
        """Ids of text with special tokens' text read as plain text (a chat message cannot forge a marker)."""
        self.tokenizer.encode_special_tokens = True
        try:
            return self.encode(text)
        finally:
            self.tokenizer.encode_special_tokens = False

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def merge_lines(merges):
    """tokenizer.json merges as 'a b' lines (newer files store [a, b] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def gpt2_spec_of(vocab, merges):
    """{"kind": "gpt2"} when vocab and merges are GPT-2's, with "special": {name: id} for tokens added after its
    50,257 (the chat markers, say) when they take the next ids in order; else None."""
    gpt2_vocab, gpt2_merges = gpt2_vocab_and_merges()
    if merges != gpt2_merges or any(vocab.get(token) != i for token, i in gpt2_vocab.items()):
        return None
    special = {token: i for token, i in vocab.items() if token not in gpt2_vocab}
    if sorted(special.values()) != list(range(len(gpt2_vocab), len(gpt2_vocab) + len(special))):
        return None
    return {"kind": "gpt2", "special": special} if special else {"kind": "gpt2"}


def char_spec_of(tokenizer):
    """{"kind": "char", ...} when a tokenizer.json is a character tokenizer as char_tokenizer_json writes it (one
    character per token, ids in order, split into characters, joined when decoding), else None."""
    model, split = tokenizer.get("model") or {}, tokenizer.get("pre_tokenizer") or {}
    vocab = model.get("vocab") if model.get("type") == "WordLevel" else None
    joined = (tokenizer.get("decoder") or {}).get("type") == "Fuse"
    by_character = split == {"type": "Split", "pattern": {"Regex": "(?m)."}, "behavior": "Isolated", "invert": False}
    if not isinstance(vocab, dict) or tokenizer.get("added_tokens") or not (joined and by_character):
        return None
    chars = sorted(vocab, key=vocab.get)
    in_order = all(len(c) == 1 for c in chars) and [vocab[c] for c in chars] == list(range(len(chars)))
    return {"kind": "char", "chars": "".join(chars)} if in_order else None


def json_object(path, text):
    """The JSON object a file's text holds; a FileFormatError naming path:line for anything else."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): a cut or damaged file") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def eos_id(config):
    eos = config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def tokenizer_spec(path, config):
    """The spec of the folder's tokenizer: GPT-2's BPE and our character vocabularies by their own kinds, any other
    tokenizer.json as {"kind": "hf"}."""
    tokenizer_file, vocab_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.json")
    if os.path.exists(tokenizer_file):
        text = read_text(tokenizer_file)
        tokenizer = json_object(tokenizer_file, text)
        model = tokenizer.get("model") or {}
        vocab = {**model.get("vocab", {}), **{t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}}
        gpt2 = gpt2_spec_of(vocab, merge_lines(model.get("merges", []))) if model.get("type") == "BPE" else None
        return gpt2 or char_spec_of(tokenizer) or {"kind": "hf", "name": os.path.basename(os.path.normpath(path)),
                                           "json": text, "eot": eos_id(config)}
    if os.path.exists(vocab_file) and os.path.exists(os.path.join(path, "merges.txt")):
        vocab = json_object(vocab_file, read_text(vocab_file))
        merges = [line for line in read_text(os.path.join(path, "merges.txt")).split("\n")
                  if line.strip() and not line.startswith("#version")]
        gpt2 = gpt2_spec_of(vocab, merges)
        if gpt2:
            return gpt2
        raise Unsupported(f"{path}: vocab.json + merges.txt that are not GPT-2's need a tokenizer.json as well")
    raise Unsupported(f"{path} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


# -------------------------------------------------------------------------------------------------------- config

def setting(config, key):
    """A config.json field, or what transformers assumes when the file leaves it out."""
    defaults = {**COMMON_DEFAULTS, **DEFAULTS[config["model_type"]]}
    if key in config:
        return config[key]
    if key not in defaults:
        raise Unsupported(f"config.json lacks {key}")
    return defaults[key]


def rope_settings(config):
    """(theta, rope_type, partial_rotary_factor), from transformers v5's rope_parameters or v4's top-level fields."""
    theta = setting(config, "rope_theta")
    params = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}), "rope_theta": theta}
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is None:
        partial = DEFAULTS[config["model_type"]].get("partial_rotary_factor", 1.0)
    return params.get("rope_theta", theta), rope_type, partial


def layer_kinds(config):
    """'L' (sliding window) or 'G' (full causal) for each layer, and the window."""
    kind, n_layer = config["model_type"], config["num_hidden_layers"]
    if kind in ("llama", "glm4_moe", "deepseek_v3"):
        return "G" * n_layer, None
    window = setting(config, "sliding_window")
    if kind == "mistral":
        return ("L" if window else "G") * n_layer, window
    if kind in ("qwen2", "qwen3") and not setting(config, "use_sliding_window"):
        window = None
    first_sliding = setting(config, "max_window_layers") if window is not None else n_layer
    types = config.get("layer_types") or ["sliding_attention" if i >= first_sliding else "full_attention"
                                          for i in range(n_layer)]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise Unsupported(f"layer_types {unknown}: only full and sliding-window attention exist here")
    if "sliding_attention" in types and not window:
        raise Unsupported("layer_types names sliding-window layers but no sliding_window is in force")
    return "".join("L" if t == "sliding_attention" else "G" for t in types), window


def shortest_period(kinds):
    """The shortest pattern that tiles to `kinds` ('LGLGLG' -> 'LG'): our attn_pattern."""
    return next(kinds[:p] for p in range(1, len(kinds) + 1) if (kinds[:p] * len(kinds))[:len(kinds)] == kinds)


def moe_settings(config):
    """Our MoE fields for dots1 / glm4_moe, refusing routing that ours does not compute."""
    if not setting(config, "norm_topk_prob"):
        raise Unsupported("norm_topk_prob=false: our MoE normalises the chosen experts' gates to sum to one")
    if setting(config, "topk_group") != setting(config, "n_group"):
        raise Unsupported(f"group-limited routing (n_group={setting(config, 'n_group')}, "
                          f"topk_group={setting(config, 'topk_group')}): ours chooses among all experts")
    if config["model_type"] == "deepseek_v3" and setting(config, "first_k_dense_replace") >= config["num_hidden_layers"]:
        return {}  # every layer dense
    return {"n_expert": config["n_routed_experts"], "n_expert_active": config["num_experts_per_tok"],
            "n_shared_expert": setting(config, "n_shared_experts"), "moe_hidden": config["moe_intermediate_size"],
            "n_dense_layers": setting(config, "first_k_dense_replace")}


def mla_settings(config):
    """Our MLA fields for deepseek_v3 (head_dim is left to its default: MLA's widths are all explicit)."""
    n_head = config["num_attention_heads"]
    if (setting(config, "num_key_value_heads") or n_head) != n_head:
        raise Unsupported("num_key_value_heads differs from num_attention_heads: MLA here has no grouped K/V heads")
    fields = {"kv_lora_rank": setting(config, "kv_lora_rank"), "q_lora_rank": setting(config, "q_lora_rank") or 0,
              "qk_nope_head_dim": setting(config, "qk_nope_head_dim"),
              "qk_rope_head_dim": setting(config, "qk_rope_head_dim"), "v_head_dim": setting(config, "v_head_dim")}
    head_dim = 0 if config["hidden_size"] % n_head == 0 else fields["v_head_dim"]
    return dict(fields, n_kv_head=n_head, head_dim=head_dim, qk_norm=False)


def gpt_config(config):
    """The GPTConfig that computes the same function as a Hugging Face config.json, or Unsupported saying why not."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise Unsupported(f"model_type {kind!r}: supported are {', '.join(ARCHITECTURES)}")
    if setting(config, "hidden_act") != "silu":
        raise Unsupported(f"hidden_act={setting(config, 'hidden_act')!r}: our MLP is SwiGLU (SiLU-gated)")
    theta, rope_type, partial = rope_settings(config)
    if rope_type != "default":
        raise Unsupported(f"rope type {rope_type!r} (rope scaling): we implement plain RoPE only")
    if partial != 1.0:
        raise Unsupported(f"partial_rotary_factor={partial}: our RoPE rotates the whole head")
    kinds, window = layer_kinds(config)
    n_head = config["num_attention_heads"]
    args = dict(block_size=setting(config, "max_position_embeddings"), vocab_size=config["vocab_size"],
                n_layer=config["num_hidden_layers"], n_embd=config["hidden_size"], n_head=n_head,
                n_kv_head=setting(config, "num_key_value_heads") or n_head,
                head_dim=setting(config, "head_dim") or config["hidden_size"] // n_head, mlp="swiglu",
                mlp_hidden=config["intermediate_size"], qk_norm=kind in ("qwen3", "dots1") or (
                    kind == "glm4_moe" and setting(config, "use_qk_norm")),
                tie_embeddings=setting(config, "tie_word_embeddings"), rope_theta=float(theta),
                attn_pattern=shortest_period(kinds), norm_eps=setting(config, "rms_norm_eps"))
    if window:
        args["local_window"] = window
    if kind == "deepseek_v3":
        args.update(mla_settings(config))
    if kind in MOE_ARCHITECTURES:
        args.update(moe_settings(config))
    return GPTConfig(**args)


# ------------------------------------------------------------------------------------------------------- weights

def read_tensors(path):
    """Every tensor of the folder's safetensors files (one file, or the shards its index lists)."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = json_object(index, read_text(index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FileFormatError(f"{index}: expected an object with a weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        found = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        pickled = f"; {found[0]} is a pickle, which runs code when loaded: convert it to safetensors" if found else ""
        raise Unsupported(f"{path} has no model.safetensors (or index){pickled}")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(path, name)))
        except Exception as e:  # safetensors' own error type (a cut or damaged file) is no ValueError
            raise FileFormatError(f"{os.path.join(path, name)}: not a readable safetensors file ({e}): a cut or "
                                  "damaged download") from None
    return tensors


def ignorable(name, tensor, n_layer):
    """Tensors that compute nothing here: cached rotary tables, GLM's multi-token-prediction layers past the last
    (transformers skips both), and empty ones (the zero-width shared experts of a MoE without any)."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    beyond = layer is not None and int(layer.group(1)) >= n_layer
    return name.endswith("rotary_emb.inv_freq") or beyond or tensor.numel() == 0


def check_biases(tensors):
    """Linear biases exist in Qwen2 (q, k, v) and optionally in the others; we have none, so only zeros can go."""
    for name, tensor in tensors.items():
        if name.endswith(".bias") and tensor.count_nonzero():
            raise Unsupported(f"{name} is not zero: our layers have no biases")


def state_from_hf(tensors, cfg, routed_scale=1.0):
    """Our state_dict for cfg from a folder's tensors, float32; a scaled router's factor goes into the experts'
    down projections (the same product, rounded once more)."""
    tensors = {k: v for k, v in tensors.items() if not ignorable(k, v, cfg.n_layer)}
    check_biases(tensors)
    state, used = {}, set()
    for name, shape in state_shapes(cfg).items():
        if is_expert_weight(name):
            tensor = stacked_experts(name, cfg.n_expert, tensors)
            used |= {k for k in tensors if k.startswith("model.layers." + name.split(".")[1] + ".mlp.experts.")}
            tensor = tensor * routed_scale if name.endswith("w_down") else tensor
        else:
            source = "model.embed_tokens.weight" if name == "lm_head.weight" and cfg.tie_embeddings else hf_name(name)
            if source not in tensors:
                raise Unsupported(f"the folder lacks {source} (for our {name})")
            tensor = tensors[source]
            used.add(source)
        if tuple(tensor.shape) != tuple(shape):
            raise Unsupported(f"{name}: shape {tuple(tensor.shape)} in the folder, {tuple(shape)} expected")
        state[name] = tensor.float()
    unused = sorted(k for k in tensors if k not in used and not k.endswith(".bias")
                    and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if unused:
        raise Unsupported(f"tensors this model has no place for: {', '.join(unused[:5])}")
    return state


def read_hf_checkpoint(path):
    """A checkpoint dict (model, model_args, tokenizer, config) from a Hugging Face folder; Unsupported (a
    ValueError) with the reason when we cannot compute that model exactly."""
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")
    config = json_object(config_file, read_text(config_file))
    try:
        cfg = gpt_config(config)
    except KeyError as e:
        raise Unsupported(f"{config_file} lacks {e}: a cut or incomplete config.json") from None
    except TypeError as e:
        raise Unsupported(f"{config_file}: a field of the wrong type ({e})") from None
    routed_scale = setting(config, "routed_scaling_factor") if cfg.n_expert else 1.0
    state = state_from_hf(read_tensors(path), cfg, routed_scale)
    if config["model_type"] == "deepseek_v3" and setting(config, "rope_interleave"):
        state = {name: interleaved_rope_rows(name, t, cfg, to_ours=True) for name, t in state.items()}
    return {"model": state, "model_args": asdict(cfg), "tokenizer": tokenizer_spec(path, config),
            "config": {"init_from": f"hf:{path}"}, "iter_num": 0}

