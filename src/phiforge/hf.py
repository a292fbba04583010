"""Lossless conversion between Hugging Face `PhiForCausalLM` checkpoints and phiforge checkpoints.

The only structural difference is attention: HF keeps q_proj/k_proj/v_proj separate, we keep one fused
`qkv` Linear with rows [q; k; v]. Everything else is a rename (`model.` prefix, `self_attn` -> `attn`).
Tensors are copied bit for bit and keep their dtype unless a dtype is asked for. Nothing here imports
transformers: the output is plain config.json + safetensors that `PhiForCausalLM.from_pretrained` reads.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import torch

from phiforge.config import BadValue, load_yaml
from phiforge.errors import CheckpointError, ConfigError
from phiforge.fileio import claim_output_dir, write_json_atomic
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import on_meta
from phiforge.model_files import (ExportSource, check_state_dict, conversion_summary, export_model, load_state_dict,
                                  read_json, save_checkpoint, save_state_dict)
from phiforge.tokenizer import EOT, EOT_ID, load_tokenizer, save_tokenizer_files

HF_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"

# Phi2Config field -> HF PhiConfig key.
_TO_HF = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "rotary_pct": "partial_rotary_factor",
    "rope_theta": "rope_theta",
    "layer_norm_eps": "layer_norm_eps",
    "qk_layernorm": "qk_layernorm",
    "init_std": "initializer_range",
    "embd_pdrop": "embd_pdrop",
    "resid_pdrop": "resid_pdrop",
    "attn_pdrop": "attention_dropout",
}
# Fields with no HF key that change nothing HF needs to know (the padding is already in vocab_size).
_NO_HF_KEY = {"pad_vocab_multiple"}

# transformers' PhiConfig defaults, for keys a config.json leaves out (HF itself fills them the same way).
_HF_DEFAULTS = {
    "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    "attention_dropout": 0.0, "hidden_act": "gelu_new", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "partial_rotary_factor": 0.5, "qk_layernorm": False,
}
_QKV = ("q_proj", "k_proj", "v_proj")


# ---------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf_config: dict, source: str = "HF config") -> Phi2Config:
    """Phi2Config for an HF PhiConfig dict (config.json, named `source` in errors). Raises CheckpointError for
    values of the wrong type or out of range (naming the HF key) and for what we cannot reproduce."""
    c = {**_HF_DEFAULTS, **hf_config}
    rope = hf_config.get("rope_parameters") or {}  # transformers >= 5 writes the RoPE keys here, not at the top
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_parameters in {source} must be a mapping, got {rope!r}")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope_parameters {rope} in {source} is not supported (only plain RoPE)")
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in hf_config and key in rope:
            c[key] = rope[key]
    if c["hidden_act"] not in ("gelu_new", "gelu_pytorch_tanh"):  # both are gelu(approximate="tanh")
        raise CheckpointError(f"unsupported hidden_act '{c['hidden_act']}' in {source} "
                              "(phiforge implements gelu_new)")
    if c["tie_word_embeddings"]:
        raise CheckpointError(f"tie_word_embeddings=true in {source} is not supported "
                              "(Phi-2 has an untied lm_head)")
    if c["rope_scaling"] is not None:
        raise CheckpointError(f"rope_scaling {c['rope_scaling']} in {source} is not supported (only plain RoPE)")
    vocab = c["vocab_size"]
    ours = {ours: c[theirs] for ours, theirs in _TO_HF.items()}
    # keep the vocab exactly as stored: the embedding must match the file row for row
    ours["pad_vocab_multiple"] = 64 if isinstance(vocab, int) and vocab % 64 == 0 else 1
    try:
        cfg = Phi2Config.from_dict(ours)
    except BadValue as e:
        raise CheckpointError(f"bad value in {source}: '{_TO_HF.get(e.key, e.key)}' {e.problem}") from None
    except ConfigError as e:
        raise CheckpointError(f"unusable {source}: {e}") from None
    if c.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"head_dim {c['head_dim']!r} in {source} is not hidden_size / num_attention_heads "
                              f"({cfg.head_dim}); that is not supported")
    return cfg


def hf_unrepresentable(model_config: dict, cls: type = Phi2Config) -> list[str]:
    """Model config keys switched on that a HF PhiConfig cannot express (e.g. MoE or cross-attention blocks).

    Generic on purpose: any field that is neither mapped nor at its 'off' value (None or the dataclass
    default) counts, so new architecture options are refused until a mapping is written for them."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return sorted(k for k, v in model_config.items()
                  if k not in _TO_HF and k not in _NO_HF_KEY and v is not None and v != defaults.get(k, None))


def config_to_hf(cfg: Phi2Config, torch_dtype: str = "float32", eot: int | None = EOT_ID) -> dict:
    """config.json contents for transformers' PhiForCausalLM; eot: the tokenizer's <|endoftext|> id."""
    bad = hf_unrepresentable(cfg.to_dict(), type(cfg))
    if bad:
        raise CheckpointError(f"model config field(s) {', '.join(bad)} cannot be represented in a Hugging Face "
                              "PhiConfig; this model cannot be exported with `convert to-hf`")
    d = cfg.to_dict()
    eot = eot if eot is not None and eot < cfg.vocab_size else None  # small test vocabularies lack the row
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        **{theirs: d[ours] for ours, theirs in _TO_HF.items()},
        "hidden_act": "gelu_new",
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": torch_dtype,
    }


# ---------------------------------------------------------------------------------------------
# State dicts


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: Phi2Config) -> dict[str, torch.Tensor]:
    """Our keys -> HF keys, splitting each fused qkv into q_proj, k_proj, v_proj."""
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            layer, kind = k.split(".attn.qkv.")
            for name, part in zip(_QKV, v.split(sizes, dim=0)):
                out[f"model.{layer}.self_attn.{name}.{kind}"] = part.clone()  # own storage: safetensors refuses views
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            out["model." + k.replace(".attn.", ".self_attn.")] = v
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: Phi2Config) -> dict[str, torch.Tensor]:
    """HF keys -> our keys, fusing q_proj, k_proj, v_proj into qkv (rows [q; k; v]). Expects all three per layer."""
    out, parts = {}, {}
    for k, v in sd.items():
        name = k.removeprefix("model.").replace(".self_attn.", ".attn.")
        for proj in _QKV:
            if f".attn.{proj}." in name:
                layer, kind = name.split(f".attn.{proj}.")
                parts.setdefault(f"{layer}.attn.qkv.{kind}", {})[proj] = v
                break
        else:
            out[name] = v
    for key, p in parts.items():
        out[key] = torch.cat([p[name] for name in _QKV], dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# Directories


def read_hf_config(src_dir: Path) -> dict:
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory not found: {src_dir}")
    hf = read_json(src_dir / "config.json", "Hugging Face config")
    if hf.get("model_type") != "phi":
        hint = ""
        if hf.get("format") == "phiforge":
            hint = " (it is already a phiforge checkpoint)"
        elif hf.get("model_type") == "phi-msft":
            hint = " (old remote-code layout; use a current microsoft/phi-2 revision)"
        raise CheckpointError(f"{src_dir / 'config.json'} has model_type {hf.get('model_type')!r}, "
                              f"expected 'phi'{hint}")
    return hf


def convert_from_hf(src_dir: Path, out_dir: Path, overwrite: bool = False, **save_kwargs) -> dict:
    """HF PhiForCausalLM directory -> phiforge checkpoint (same dtype, tokenizer files carried over)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    claim_output_dir(out_dir, "model", [src_dir], overwrite)
    cfg = config_from_hf(read_hf_config(src_dir), source=str(src_dir / "config.json"))
    if not any(src_dir.glob("*.safetensors")) and any(src_dir.glob("*.bin")):
        raise CheckpointError(f"{src_dir} has only PyTorch .bin weights; phiforge reads safetensors "
                              "(re-save with save_pretrained(..., safe_serialization=True))")
    hf_state = load_state_dict(src_dir)
    with on_meta():
        model = Phi2(cfg)
    # Check against HF names first so errors name the keys that are actually in the user's files.
    check_state_dict(state_dict_to_hf(model.state_dict(), cfg), hf_state, str(src_dir))
    model.load_state_dict(state_dict_from_hf(hf_state, cfg), strict=True, assign=True)
    save_checkpoint(model, out_dir, tokenizer_dir=src_dir, inputs=[src_dir], overwrite=overwrite, **save_kwargs)
    return conversion_summary(model.state_dict(), out_dir)


def convert_to_hf(src_dir: Path, out_dir: Path, dtype: str | None = None,
                  max_shard_bytes: int = HF_SHARD_BYTES, overwrite: bool = False) -> dict:
    """phiforge checkpoint -> directory that PhiForCausalLM / AutoTokenizer.from_pretrained (fast and slow) load,
    with a model card. The summary's "warnings" name what other tools will get wrong."""

    def write(out: Path, src: ExportSource) -> list[str]:
        cfg, state = src.cfg, src.state
        torch_dtype = str(state["lm_head.weight"].dtype).removeprefix("torch.")
        hf_config = config_to_hf(cfg, torch_dtype=torch_dtype, eot=load_tokenizer(src.dir).token_to_id(EOT))
        warnings = []
        if cfg.rope_theta != 10000:
            warnings.append(f"rope_theta is {cfg.rope_theta:g}: llama.cpp's Phi-2 GGUF converter ignores rope_theta "
                            "(it uses 10000), so a GGUF made from this export computes other logits; transformers "
                            "reads it correctly")
        save_state_dict(state_dict_to_hf(state, cfg), out, max_shard_bytes=max_shard_bytes)
        write_json_atomic(out / "config.json", hf_config)
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
        write_json_atomic(out / "generation_config.json", gen)
        save_tokenizer_files(out, source_dir=src.dir)
        write_hf_tokenizer_files(out, model_max_length=cfg.max_seq_len)
        (out / "README.md").write_text(model_card(cfg, src.meta, src.dir, state, Path(out_dir).name, warnings),
                                       encoding="utf-8")
        return warnings

    return export_model(src_dir, out_dir, "hf", "Hugging Face PhiConfig", hf_unrepresentable, write, dtype=dtype,
                        overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Tokenizer files for transformers' slow tokenizers, and the model card


def _byte_level(pre: dict | None) -> dict | None:
    """The ByteLevel pre-tokenizer (GPT-2's regex split) of a tokenizer.json, alone or in a Sequence."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return pre if pre.get("use_regex", True) else None
    if pre.get("type") == "Sequence":
        found = [p for p in pre.get("pretokenizers", []) if isinstance(p, dict)]
        return _byte_level(found[0]) if len(found) == 1 else None
    return None


def write_hf_tokenizer_files(out_dir: Path, model_max_length: int) -> None:
    """Next to OUT/tokenizer.json: vocab.json, merges.txt (derived from it, for any GPT-2-style byte-level BPE),
    special_tokens_map.json and the added tokens in tokenizer_config.json, so `AutoTokenizer(use_fast=False)`
    builds the same tokenizer; model_max_length becomes the model's context."""
    import json

    out_dir = Path(out_dir)
    tok = read_json(out_dir / "tokenizer.json", "tokenizer")
    tok_cfg = read_json(out_dir / "tokenizer_config.json", "tokenizer config")
    tok_cfg["model_max_length"] = model_max_length
    model, pre = tok.get("model") or {}, _byte_level(tok.get("pre_tokenizer"))
    if model.get("type") == "BPE" and pre is not None:  # other models (Unigram, WordPiece) have no GPT-2 files
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        (out_dir / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        tok_cfg["add_prefix_space"] = bool(pre.get("add_prefix_space", False))
    added = {str(t["id"]): {k: t.get(k, False) for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                          "special")} for t in tok.get("added_tokens", [])}
    tok_cfg.setdefault("added_tokens_decoder", added)
    if not (out_dir / "special_tokens_map.json").exists():
        special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tok_cfg.get(k)}
        write_json_atomic(out_dir / "special_tokens_map.json", special)
    write_json_atomic(out_dir / "tokenizer_config.json", tok_cfg)


def _how_trained(meta: dict, src_dir: Path) -> list[str]:
    """What the checkpoint's config.json (and the run's config.yaml, when it sits in a run) say about its origin."""
    import yaml

    lines = []
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    if "step" in train:
        what = f"trained with `phiforge train` for {train['step']:,} steps"
        if isinstance(train.get("tokens"), int):
            what += f" ({train['tokens']:,} tokens)"
        if train.get("stage"):
            what += f", stage {train['stage']}"
        lines.append(what)
    run_cfg = src_dir.parent.parent / "config.yaml"
    if src_dir.parent.name == "checkpoints" and run_cfg.is_file():
        try:
            run = load_yaml(run_cfg.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            run = {}
        data, optim = run.get("data") or {}, run.get("optim") or {}
        if isinstance(data, dict) and data.get("dir"):
            lines.append(f"data: `{data['dir']}`, sequences of {data.get('seq_len', '?')} tokens")
        if isinstance(optim, dict) and run.get("micro_batch_size"):
            lines.append(f"batch {run['micro_batch_size']} x {run.get('grad_accum_steps', 1)} accumulation steps per "
                         f"device; AdamW, lr {optim.get('lr', '?')}, {optim.get('schedule', 'cosine')} schedule, "
                         f"{optim.get('warmup_steps', '?')} warmup steps")
    if isinstance(meta.get("upcycled_from"), dict):
        u = meta["upcycled_from"]
        lines.append(f"mixture-of-experts layers added to `{u.get('src')}` by `phiforge convert upcycle` "
                     f"(init {u.get('init')})")
    if isinstance(meta.get("converted_from"), dict):
        lines.append(f"converted from a {meta['converted_from'].get('format', '?')} checkpoint "
                     f"({meta['converted_from'].get('name') or 'unnamed'})")
    return lines or ["no training record in the checkpoint (e.g. an initial or converted model)"]


def model_card(cfg: Phi2Config, meta: dict, src_dir: Path, state: dict, name: str, warnings: list[str]) -> str:
    from phiforge import __version__

    params = sum(v.numel() for v in state.values())
    dtype = str(state["lm_head.weight"].dtype).removeprefix("torch.")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [phi, phiforge]", "---",
             "", f"# {name}", "",
             f"A Phi-2-architecture language model (`PhiForCausalLM`), exported by phiforge {__version__} "
             "(`phiforge convert to-hf`).", "",
             f"- {params:,} parameters ({dtype}): {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads "
             f"({cfg.n_kv_head} key/value), MLP {cfg.intermediate_size}, rotary {cfg.rotary_pct:g} of each head "
             f"(theta {cfg.rope_theta:g})",
             f"- context: {cfg.max_seq_len} tokens; vocabulary rows: {cfg.vocab_size:,}",
             *(f"- {line}" for line in _how_trained(meta, src_dir)), "",
             "## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'tok = AutoTokenizer.from_pretrained("{name}")',
             f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```", ""]
    if warnings:
        lines += ["## Notes", "", *(f"- {w}" for w in warnings), ""]
    return "\n".join(lines)
