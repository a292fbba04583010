"""Lossless conversion between LitGPT checkpoints and phiforge checkpoints, and the LitGPT config of a Phi2Config.

A LitGPT checkpoint directory holds `lit_model.pth` (a torch state dict; `litgpt pretrain` wraps it as
{"model": ..., "optimizer": ..., ...}) and `model_config.yaml` (the fields of `litgpt.Config`). LitGPT maps
Phi-2 as `Config.from_name("phi-2")`: parallel residual from one shared LayerNorm, partial rotary
(`rotary_percentage`), gelu-tanh, biases and an lm_head bias; a scaled member of the family is the same entry
with size overrides. Names (ours -> LitGPT):

    embed_tokens                       transformer.wte
    layers.i.input_layernorm           transformer.h.i.norm_1
    layers.i.attn.qkv                  transformer.h.i.attn.qkv     (see the layouts below)
    layers.i.attn.dense                transformer.h.i.attn.proj
    layers.i.attn.{q,k}_layernorm      transformer.h.i.attn.norm_{q,k}   (qk_layernorm = norm_qk)
    layers.i.mlp.fc1 / fc2             transformer.h.i.mlp.fc / proj
    final_layernorm, lm_head           transformer.ln_f, lm_head

The fused attention weight has two layouts, both read here (LitGPT itself reads both):
  - "split": `attn.qkv` with rows [q (n_head heads); k (n_query_groups); v (n_query_groups)] -- the layout of
    litgpt 0.5.x (`CausalSelfAttention.forward` splits qkv into (q, k, v) sizes), identical to ours;
  - "grouped": the older per-head-group interleaved `attn.attn`, rows [q heads of group 0, k_0, v_0,
    q heads of group 1, k_1, v_1, ...], which litgpt 0.5.x still loads through `qkv_reassemble`. Query head
    h belongs to group h // (n_head // n_query_groups), as in our SDPA `enable_gqa` and LitGPT's
    repeat_interleave.
`to-litgpt` writes "split" by default and "grouped" on request (for older LitGPT releases).

Loading a .pth uses torch.load(weights_only=True): tensors and plain containers only, never pickled code.
Nothing here imports litgpt.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from phiforge.config import read_user_mapping
from phiforge.errors import CheckpointError, ConfigError
from phiforge.fileio import claim_output_dir, output_dir
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import on_meta
from phiforge.model_files import (ExportSource, check_state_dict, conversion_summary, export_model, load_torch_file,
                                  save_checkpoint)
from phiforge.tokenizer import save_tokenizer_files

LIT_WEIGHTS = "lit_model.pth"
LIT_CONFIG = "model_config.yaml"
PROMPT_STYLE = "prompt_style.yaml"
# litgpt.prompts.Default: the prompt as given. Without this file `litgpt generate`/`chat` pick a style from the
# config name, and a name starting with "phi-2" gets Phi-2's "Instruct: {prompt}\nOutput:", which a base model
# trained by phiforge never saw. (litgpt.prompts.load_prompt_style reads {"class_path": ...}.)
DEFAULT_PROMPT_STYLE = {"class_path": "litgpt.prompts.Default"}
QKV_LAYOUTS = ("split", "grouped")

# litgpt.Config("phi-2") (litgpt/config.py, checked against Config.from_name("phi-2") in the tests).
PHI2_LIT = {
    "name": "phi-2", "hf_config": {"org": "microsoft", "name": "phi-2"}, "block_size": 2048, "n_layer": 32,
    "n_embd": 2560, "vocab_size": 50257, "padding_multiple": 512, "padded_vocab_size": 51200,
    "norm_class_name": "LayerNorm", "norm_eps": 1e-5, "norm_qk": False, "norm_qk_type": "default",
    "post_attention_norm": False, "post_mlp_norm": False, "parallel_residual": True, "shared_attention_norm": True,
    "n_head": 32, "head_size": 80, "n_query_groups": 32, "attn_bias": False, "rope_base": 10000,
    "rotary_percentage": 0.4, "rope_condense_ratio": 1, "intermediate_size": 10240, "bias": True,
    "mlp_class_name": "GptNeoxMLP", "gelu_approximate": "tanh", "n_expert": 0, "n_expert_per_token": 0,
    "scale_embeddings": False, "lm_head_bias": True, "norm_1": True, "norm_2": True,
}
GPT2_VOCAB = 50257  # what litgpt's phi-2 entry calls vocab_size (the tokenizer's size; padded_vocab_size is the rows)

# Phi2Config fields that only matter in training (LitGPT has no dropout and its own init).
_TRAINING_ONLY = {"init_std", "embd_pdrop", "resid_pdrop", "attn_pdrop", "pad_vocab_multiple"}
# LitGPT Config fields and the values this converter can reproduce (None: must be unset).
_LIT_MUST = {
    "norm_class_name": "LayerNorm", "parallel_residual": True, "shared_attention_norm": True,
    "mlp_class_name": "GptNeoxMLP", "gelu_approximate": "tanh", "bias": True, "lm_head_bias": True,
    "post_attention_norm": False, "post_mlp_norm": False, "norm_1": True, "scale_embeddings": False,
    "rope_condense_ratio": 1, "rope_interleave": False, "n_expert": 0, "rope_adjustments": None,
    "sliding_window_size": None, "attention_logit_softcapping": None, "final_logit_softcapping": None,
    "latent_attention": None, "rope_local_base_freq": None, "first_k_dense_replace": None,
}
# litgpt.Config's class defaults for the fields above (a model_config.yaml written by LitGPT lists every field;
# these only fill in hand-written files).
_LIT_CLASS_DEFAULTS = {
    "norm_class_name": "LayerNorm", "norm_eps": 1e-5, "norm_qk": False, "norm_qk_type": "default",
    "post_attention_norm": False, "post_mlp_norm": False, "parallel_residual": True, "shared_attention_norm": False,
    "n_head": 32, "head_size": None, "n_query_groups": None, "attention_scores_scalar": None, "rope_base": 10000,
    "rotary_percentage": 0.25, "rope_condense_ratio": 1, "rope_adjustments": None, "rope_interleave": False,
    "intermediate_size": None, "bias": True, "mlp_class_name": "GptNeoxMLP", "gelu_approximate": "none",
    "n_expert": 0, "scale_embeddings": False, "lm_head_bias": False, "final_logit_softcapping": None,
    "norm_1": True, "norm_2": True, "latent_attention": None, "rope_local_base_freq": None, "block_size": 4096,
    "n_layer": 16, "n_embd": 4096, "vocab_size": 50254, "padding_multiple": 512, "padded_vocab_size": None,
    "sliding_window_size": None, "attention_logit_softcapping": None, "first_k_dense_replace": None,
}


# ---------------------------------------------------------------------------------------------
# Config


def lit_unrepresentable(model_config: dict) -> list[str]:
    """Model config keys (Phi2Config's) switched on that a LitGPT Config cannot express: phiforge's MoE in any
    position, cross-attention."""
    return [k for k in ("moe", "xattn") if model_config.get(k) is not None]


def config_to_litgpt(cfg: Phi2Config, vocab_size: int | None = None) -> dict:
    """The fields of the litgpt.Config for `cfg`: the phi-2 entry with size overrides.

    The full phi-2 gives exactly Config.from_name("phi-2"); a scaled member is named "phi-2-<L>l-<d>d" (LitGPT's
    own lit->HF converter picks its Phi mapping by the "phi" prefix). vocab_size is the tokenizer's size
    (LitGPT's padded_vocab_size holds the embedding rows); default: GPT-2's 50257, capped at the rows.
    """
    bad = lit_unrepresentable(cfg.to_dict())
    if bad:
        raise CheckpointError(f"model config field(s) {', '.join(bad)} cannot be represented in a LitGPT Config; "
                              "this model cannot be used with LitGPT")
    theta = cfg.rope_theta
    d = dict(PHI2_LIT)
    d.update({
        "block_size": cfg.max_seq_len, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
        "n_query_groups": cfg.n_kv_head, "head_size": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "rotary_percentage": cfg.rotary_pct, "rope_base": int(theta) if float(theta).is_integer() else theta,
        "norm_eps": cfg.layer_norm_eps, "norm_qk": cfg.qk_layernorm, "padded_vocab_size": cfg.vocab_size,
        "vocab_size": min(vocab_size or GPT2_VOCAB, cfg.vocab_size),
    })
    if d != PHI2_LIT:
        d["name"] = f"phi-2-{cfg.n_layer}l-{cfg.n_embd}d"
        d["hf_config"] = {}
    return d


def config_from_litgpt(lit: dict) -> Phi2Config:
    """Phi2Config for a LitGPT Config dict (model_config.yaml). CheckpointError for what we cannot reproduce."""
    if not isinstance(lit, dict):
        raise CheckpointError("LitGPT model config is not a mapping")
    c = {**_LIT_CLASS_DEFAULTS, **lit}
    wrong = [f"{k}={c.get(k)!r} (phiforge needs {v!r})" for k, v in _LIT_MUST.items() if c.get(k) != v]
    if c.get("norm_qk") and c.get("norm_qk_type", "default") != "default":
        wrong.append(f"norm_qk_type={c['norm_qk_type']!r} (phiforge needs 'default': per-head q/k LayerNorm)")
    if wrong:
        raise CheckpointError(f"LitGPT config '{c.get('name', '?')}' is not a Phi-2-family model phiforge can "
                              f"reproduce: {'; '.join(wrong)}")
    try:
        n_embd, n_head = int(c["n_embd"]), int(c["n_head"])
        head = c.get("head_size") or n_embd // n_head
        if head * n_head != n_embd:
            raise CheckpointError(f"LitGPT head_size {head} x n_head {n_head} != n_embd {n_embd}: phiforge needs "
                                  "head_dim = n_embd / n_head")
        scalar = c.get("attention_scores_scalar")
        if scalar not in (None, head):
            raise CheckpointError(f"LitGPT attention_scores_scalar {scalar} is not supported (phiforge scales by "
                                  "1/sqrt(head_dim))")
        rows = c.get("padded_vocab_size")
        if rows is None:
            m = int(c["padding_multiple"])
            rows = -(-int(c["vocab_size"]) // m) * m
        rows = int(rows)
        inter = c.get("intermediate_size") or 4 * n_embd
        return Phi2Config(
            vocab_size=rows, n_layer=int(c["n_layer"]), n_embd=n_embd, n_head=n_head,
            n_kv_head=int(c.get("n_query_groups") or n_head), intermediate_size=int(inter),
            max_seq_len=int(c["block_size"]), rotary_pct=float(c["rotary_percentage"]),
            rope_theta=float(c["rope_base"]), layer_norm_eps=float(c["norm_eps"]), qk_layernorm=bool(c["norm_qk"]),
            pad_vocab_multiple=64 if rows % 64 == 0 else 1,  # keep the rows exactly as stored
        )
    except (ConfigError, TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(f"unusable LitGPT model config: {e}") from None


# ---------------------------------------------------------------------------------------------
# State dicts

_RENAME = (  # ours -> LitGPT, applied to "layers.{i}." suffixes
    ("input_layernorm.", "norm_1."),
    ("attn.dense.", "attn.proj."),
    ("attn.q_layernorm.", "attn.norm_q."),
    ("attn.k_layernorm.", "attn.norm_k."),
    ("mlp.fc1.", "mlp.fc."),
    ("mlp.fc2.", "mlp.proj."),
    ("attn.qkv.", "attn.qkv."),
)
_TOP = {"embed_tokens.weight": "transformer.wte.weight", "final_layernorm.weight": "transformer.ln_f.weight",
        "final_layernorm.bias": "transformer.ln_f.bias", "lm_head.weight": "lm_head.weight",
        "lm_head.bias": "lm_head.bias"}


def qkv_to_grouped(t: torch.Tensor, n_head: int, n_groups: int, head_dim: int) -> torch.Tensor:
    """[q; k; v] rows -> per-group [q heads of g, k_g, v_g] rows (LitGPT's legacy `attn.attn` layout)."""
    per = n_head // n_groups
    q, k, v = t.split([n_head * head_dim, n_groups * head_dim, n_groups * head_dim], dim=0)
    q = q.reshape(n_groups, per * head_dim, *t.shape[1:])
    k = k.reshape(n_groups, head_dim, *t.shape[1:])
    v = v.reshape(n_groups, head_dim, *t.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(t.shape).contiguous()


def qkv_from_grouped(t: torch.Tensor, n_head: int, n_groups: int, head_dim: int) -> torch.Tensor:
    """Per-group [q heads of g, k_g, v_g] rows -> [q; k; v] rows (what litgpt's qkv_reassemble does)."""
    per = n_head // n_groups
    g = t.reshape(n_groups, (per + 2) * head_dim, *t.shape[1:])
    q, k, v = g.split([per * head_dim, head_dim, head_dim], dim=1)
    return torch.cat([q.reshape(-1, *t.shape[1:]), k.reshape(-1, *t.shape[1:]), v.reshape(-1, *t.shape[1:])],
                     dim=0).contiguous()


def state_dict_to_litgpt(sd: dict[str, torch.Tensor], cfg: Phi2Config, qkv_layout: str = "split") -> dict:
    """Our keys -> LitGPT keys. Tensors are shared, not copied, except a re-laid "grouped" qkv."""
    if qkv_layout not in QKV_LAYOUTS:
        raise ConfigError(f"unknown qkv layout '{qkv_layout}' (choose from: {', '.join(QKV_LAYOUTS)})")
    out = {}
    for k, v in sd.items():
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        if not k.startswith("layers."):
            raise CheckpointError(f"no LitGPT name for parameter '{k}'")
        _, i, rest = k.split(".", 2)
        for ours, theirs in _RENAME:
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        else:
            raise CheckpointError(f"no LitGPT name for parameter '{k}'")
        if rest.startswith("attn.qkv.") and qkv_layout == "grouped":
            out[f"transformer.h.{i}.attn.attn.{rest.split('.')[-1]}"] = qkv_to_grouped(
                v, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
            continue
        out[f"transformer.h.{i}.{rest}"] = v
    return out


def state_dict_from_litgpt(sd: dict[str, torch.Tensor], cfg: Phi2Config) -> dict[str, torch.Tensor]:
    """LitGPT keys -> our keys; a legacy grouped `attn.attn` is de-interleaved to [q; k; v]."""
    top = {v: k for k, v in _TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        if not k.startswith("transformer.h."):
            raise CheckpointError(f"unexpected LitGPT parameter '{k}' (not a Phi-2-family weight)")
        _, _, i, rest = k.split(".", 3)
        if rest.startswith("attn.attn."):
            out[f"layers.{i}.attn.qkv.{rest.split('.')[-1]}"] = qkv_from_grouped(
                v, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
            continue
        for ours, theirs in _RENAME:
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
                break
        else:
            raise CheckpointError(f"unexpected LitGPT parameter '{k}' (not a Phi-2-family weight)")
        out[f"layers.{i}.{rest}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Files


def load_lit_weights(path: Path) -> dict[str, torch.Tensor]:
    """A lit_model.pth as a flat state dict. weights_only=True: a file that needs code to unpickle is refused.

    Accepts a bare state dict (litgpt's converters) or a `litgpt pretrain` checkpoint {"model": ..., ...}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LitGPT weights not found: {path}")
    obj = load_torch_file(path, "LitGPT weights", mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("_orig_mod.").removeprefix("_forward_module."): v for k, v in obj.items()}


def read_lit_config(src_dir: Path) -> dict:
    return read_user_mapping(Path(src_dir) / LIT_CONFIG, CheckpointError, "LitGPT config",
                             missing=f"no {LIT_CONFIG} in {src_dir} (a LitGPT checkpoint directory has "
                                     f"lit_model.pth and {LIT_CONFIG})")


def convert_from_litgpt(src_dir: Path, out_dir: Path, tokenizer_dir: Path | None = None, overwrite: bool = False,
                        **save_kwargs) -> dict:
    """LitGPT checkpoint directory -> phiforge checkpoint (same dtype). The tokenizer files come from
    tokenizer_dir, else from SRC when it has a tokenizer.json, else phiforge's built-in GPT-2 BPE."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if src_dir.is_file() and src_dir.name.endswith(".pth"):
        src_dir = src_dir.parent
    if not src_dir.is_dir():
        raise CheckpointError(f"LitGPT checkpoint directory not found: {src_dir}")
    inputs = [src_dir, tokenizer_dir]
    claim_output_dir(out_dir, "model", inputs, overwrite)
    lit = read_lit_config(src_dir)
    cfg = config_from_litgpt(lit)
    state = load_lit_weights(src_dir / LIT_WEIGHTS)
    with on_meta():
        model = Phi2(cfg)
    legacy = any(".attn.attn." in k for k in state)
    expected = state_dict_to_litgpt(model.state_dict(), cfg, "grouped" if legacy else "split")
    check_state_dict(expected, state, str(src_dir / LIT_WEIGHTS))
    model.load_state_dict(state_dict_from_litgpt(state, cfg), strict=True, assign=True)
    if tokenizer_dir is None and (src_dir / "tokenizer.json").is_file():
        tokenizer_dir = src_dir
    save_checkpoint(model, out_dir, tokenizer_dir=tokenizer_dir, inputs=inputs, overwrite=overwrite,
                    extra={"converted_from": {"format": "litgpt", "name": lit.get("name"),
                                              "qkv_layout": "grouped" if legacy else "split"}},
                    **save_kwargs)
    return conversion_summary(model.state_dict(), out_dir)


def write_litgpt_files(out_dir: Path, state: dict[str, torch.Tensor], cfg: Phi2Config,
                       tokenizer_dir: Path | None = None, qkv_layout: str = "split", vocab_size: int | None = None) -> dict:
    """Write lit_model.pth (a bare state dict, as litgpt's converters write it), model_config.yaml,
    prompt_style.yaml (Default) and the tokenizer files into an existing directory; returns the LitGPT config."""
    lit_cfg = config_to_litgpt(cfg, vocab_size=vocab_size)
    lit_state = {k: v.detach().contiguous().cpu()
                 for k, v in state_dict_to_litgpt(state, cfg, qkv_layout).items()}
    torch.save(lit_state, out_dir / LIT_WEIGHTS)
    (out_dir / LIT_CONFIG).write_text(yaml.safe_dump(lit_cfg, sort_keys=True), encoding="utf-8")
    (out_dir / PROMPT_STYLE).write_text(yaml.safe_dump(DEFAULT_PROMPT_STYLE), encoding="utf-8")
    save_tokenizer_files(out_dir, source_dir=tokenizer_dir)
    return lit_cfg


def write_litgpt_checkpoint(state: dict[str, torch.Tensor], cfg: Phi2Config, out_dir: Path,
                            tokenizer_dir: Path | None = None, qkv_layout: str = "split",
                            vocab_size: int | None = None, inputs=(), overwrite: bool = False) -> dict:
    """write_litgpt_files into OUT, atomically (fileio.output_dir)."""
    with output_dir(out_dir, "litgpt", inputs=[*inputs, tokenizer_dir], overwrite=overwrite) as tmp:
        return write_litgpt_files(Path(tmp), state, cfg, tokenizer_dir, qkv_layout, vocab_size)


def convert_to_litgpt(src_dir: Path, out_dir: Path, dtype: str | None = None, qkv_layout: str = "split",
                      overwrite: bool = False) -> dict:
    """phiforge checkpoint -> LitGPT checkpoint directory (`litgpt generate`/`chat`/`finetune` read it)."""

    def write(out: Path, src: ExportSource) -> list[str]:
        write_litgpt_files(out, src.state, src.cfg, tokenizer_dir=src.dir, qkv_layout=qkv_layout)
        return []

    return export_model(src_dir, out_dir, "litgpt", "LitGPT Config", lit_unrepresentable, write, dtype=dtype,
                        overwrite=overwrite)
