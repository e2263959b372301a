"""litgpt checkpoints: the `step-00000010/` dirs its `pretrain` loop (and `finetune_full`) writes.

    ckpt=out/pretrain/run/step-00000010                  # or .../step-00000010/lit_model.pth, or .../final
    python run.py -m mode=loss 'ckpt=glob:out/pretrain/run/step-*'

A step dir holds `lit_model.pth` (a torch pickle: {"model": state_dict, "optimizer", "train_dataloader",
"iter_num", "step_count"} from `pretrain`, a bare state_dict from `convert_hf_checkpoint`), `model_config.yaml`
(litgpt's `Config` as YAML), `hyperparameters.yaml` (the run's CLI arguments) and the tokenizer files. The pickle
is read through the weights-only allow-list, memory-mapped: the optimizer's bytes are never read. The YAML files
are read with `yaml.safe_load` only.

Architecture: `model_config.yaml`, mapped onto the matching transformers class the way litgpt's own
`convert_lit_checkpoint` does (litgpt/scripts/convert_lit_checkpoint.py):
- Llama family (`LLaMAMLP` + `RMSNorm`, sequential residual, no biases) -> LlamaForCausalLM: the fused
  `attn.qkv` rows are [all queries, all keys, all values] and split; litgpt's RoPE already rotates halves, as
  transformers does, so no permute. Checkpoints from litgpt < 0.5.4 name it `attn.attn` with the rows
  interleaved per query group ([q.. k v] per group): de-interleaved first, as litgpt's own loader does.
- GPT-NeoX / Pythia (`GptNeoxMLP` + `LayerNorm`, multi-head, biases) -> GPTNeoXForCausalLM: `attn.qkv` is
  reassembled into transformers' per-head [q, k, v] rows (`qkv_reassemble`); partial rotary kept.
Anything else (Gemma's unit-offset norms, QK-norm, post-norms, sliding windows, softcapping, MoE, latent
attention, grouped queries in GPT-NeoX, RoPE scalings other than llama3, ...) is refused by name.

Step: the dir name (`step-00000010`), else `step_count` in the pickle (the `final` dir). Tokens seen: `iter_num` x
micro_batch_size x max_seq_length x devices x num_nodes from hyperparameters.yaml, as `pretrain` counts them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

FILE, CONFIG, HPARAMS = "lit_model.pth", "model_config.yaml", "hyperparameters.yaml"
COMPILE_PREFIX = "_orig_mod."
# litgpt Config fields that change the forward away from what the two transformers classes compute, with the
# value that means "off" (as litgpt's Config defaults them).
NEUTRAL = {"norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False, "shared_attention_norm": False,
           "sliding_window_size": None, "attention_logit_softcapping": None, "final_logit_softcapping": None,
           "scale_embeddings": False, "lm_head_bias": False, "norm_1": True, "norm_2": True, "latent_attention": None,
           "rope_local_base_freq": None, "rope_indices": None, "rope_interleave": False, "rope_condense_ratio": 1,
           "n_expert": 0, "attention_scores_scalar": None, "first_k_dense_replace": None}
LLAMA_LAYER = {"norm_1.weight": "input_layernorm.weight", "norm_2.weight": "post_attention_layernorm.weight",
               "attn.proj.weight": "self_attn.o_proj.weight", "mlp.fc_1.weight": "mlp.gate_proj.weight",
               "mlp.fc_2.weight": "mlp.up_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"}
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
NEOX_LAYER = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm", "attn.proj": "attention.dense",
              "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h", "attn.qkv": "attention.query_key_value",
              "attn.attn": "attention.query_key_value"}
NEOX_TOP = {"transformer.wte.weight": "gpt_neox.embed_in.weight", "lm_head.weight": "lm_head.weight",  # v4: embed_out
            "transformer.ln_f.weight": "gpt_neox.final_layer_norm.weight",
            "transformer.ln_f.bias": "gpt_neox.final_layer_norm.bias"}


# ---------------------------------------------------------------------------------------------- files


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    """lit_model.pth through the allow-list, memory-mapped (only the pages read are loaded); {"model": sd, ...}
    or a bare state dict, returned as the former. Cached per file version."""
    from ckpteval.checkpoint.safe_pickle import torch_load

    data = torch_load(path, mmap=True)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"model": data}
    raise CkptEvalError(f"checkpoint {path} is not a litgpt lit_model.pth (it holds "
                        f"{sorted(data)[:6] if isinstance(data, dict) else type(data).__name__}, neither a 'model' "
                        "state dict nor a bare one): point ckpt= at the dir litgpt saved, or set ckpt_format")


def read_lit(pth: Path) -> dict:
    st = pth.stat()
    return _read(str(pth), st.st_mtime_ns, st.st_size)


def read_yaml(path: Path) -> dict:
    """A YAML mapping via yaml.safe_load (plain data only: no tags, no objects); raises naming the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CkptEvalError(f"{path} is unreadable or not plain YAML ({_common.one_line(exc)}): re-save it with "
                            "litgpt (it writes it beside lit_model.pth)") from None
    if not isinstance(data, dict):
        raise CkptEvalError(f"{path} does not hold a YAML mapping: re-save it with litgpt")
    return data


def _state(pth: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (torch.compile's `_orig_mod.` prefix dropped; non-tensors never kept)."""
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in read_lit(pth)["model"].items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- architecture


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def resolved_config(cfg: dict, source: Path) -> dict:
    """litgpt's Config fields with its __post_init__ defaults filled in (head_size, query groups, padded vocab,
    intermediate size, rotary dims), read as plain values."""
    c = dict(cfg)
    try:
        c["n_head"], c["n_embd"], c["n_layer"] = int(c["n_head"]), int(c["n_embd"]), int(c["n_layer"])
        c["head_size"] = int(c.get("head_size") or c["n_embd"] // c["n_head"])
        c["n_query_groups"] = int(c.get("n_query_groups") or c["n_head"])
        vocab = int(c.get("vocab_size", 50254))
        c["padded_vocab_size"] = int(c.get("padded_vocab_size") or _find_multiple(vocab, int(c.get("padding_multiple",
                                                                                                  512))))
        mlp = c.get("mlp_class_name", "GptNeoxMLP")
        c["mlp_class_name"] = mlp
        c["intermediate_size"] = int(c.get("intermediate_size") or 4 * c["n_embd"])
        c["rope_n_elem"] = int(float(c.get("rotary_percentage", 0.25)) * c["head_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CkptEvalError(f"{source} is not a litgpt model config ({type(exc).__name__}: {exc}): re-save it with "
                            "litgpt") from None
    return c


def _refuse(source: Path, what: str, family: str = "") -> CkptEvalError:
    return CkptEvalError(f"litgpt config {source} describes a model with {what}, which has no transformers "
                         f"counterpart here{family}: convert it with litgpt's own `litgpt convert_from_litgpt` "
                         "(then ckpt= the HF dir)")


def hf_config_from_litgpt(cfg: dict, source: Path):
    """The transformers config matching litgpt's Config (Llama family or GPT-NeoX), or one error naming every
    option that has no counterpart."""
    c = resolved_config(cfg, source)
    off = [f"{k}={c[k]!r}" for k, v in NEUTRAL.items() if k in c and c[k] != v]
    name = str(c.get("name", ""))
    if "gemma" in name.lower():
        off.append(f"name={name!r} (Gemma's unit-offset RMSNorm)")
    if "olmo" in name.lower() and c.get("norm_class_name") == "LayerNorm":
        off.append(f"name={name!r} (OLMo's non-parametric LayerNorm)")
    mlp, norm = c["mlp_class_name"], c.get("norm_class_name", "LayerNorm")
    if mlp == "LLaMAMLP":
        off += [f"{k}={c.get(k)!r}" for k, ok in (
            ("norm_class_name", norm == "RMSNorm"), ("parallel_residual", c.get("parallel_residual") is False),
            ("bias", not c.get("bias", True)), ("attn_bias", not c.get("attn_bias")),
            ("rotary_percentage", c["rope_n_elem"] == c["head_size"])) if not ok]
        rope = _llama_rope(c, source, off)
        if off:
            raise _refuse(source, ", ".join(off), " (litgpt's Llama family maps onto LlamaForCausalLM: RMSNorm, "
                                                  "sequential residual, no biases, full rotary)")
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=c["padded_vocab_size"], hidden_size=c["n_embd"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"], num_key_value_heads=c["n_query_groups"],
            head_dim=c["head_size"], rms_norm_eps=float(c.get("norm_eps", 1e-5)), rope_parameters=rope,
            max_position_embeddings=int(c.get("block_size", 4096)), tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            architectures=["LlamaForCausalLM"])
    if mlp == "GptNeoxMLP":
        act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(str(c.get("gelu_approximate", "none")))
        off += [f"{k}={c.get(k)!r}" for k, ok in (
            ("norm_class_name", norm == "LayerNorm"), ("bias", c.get("bias", True) is True),
            ("n_query_groups", c["n_query_groups"] == c["n_head"]), ("gelu_approximate", act is not None),
            ("head_size", c["head_size"] * c["n_head"] == c["n_embd"]),
            ("rope_adjustments", not c.get("rope_adjustments"))) if not ok]
        if off:
            raise _refuse(source, ", ".join(off), " (GptNeoxMLP models map onto GPTNeoXForCausalLM: LayerNorm, "
                                                  "multi-head attention, biases)")
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=c["padded_vocab_size"], hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"],
            num_attention_heads=c["n_head"], intermediate_size=c["intermediate_size"], hidden_act=act,
            max_position_embeddings=int(c.get("block_size", 4096)), layer_norm_eps=float(c.get("norm_eps", 1e-5)),
            use_parallel_residual=bool(c.get("parallel_residual", True)), attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": float(c.get("rope_base", 10000)),
                             "partial_rotary_factor": c["rope_n_elem"] / c["head_size"]},
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, architectures=["GPTNeoXForCausalLM"])
    raise _refuse(source, f"mlp_class_name={mlp!r}" + (f", {', '.join(off)}" if off else ""),
                  " (LLaMAMLP and GptNeoxMLP models are read)")


def _llama_rope(c: dict, source: Path, off: list[str]) -> dict:
    """transformers' rope_parameters for litgpt's RoPE: plain, or the llama3 frequency adjustment."""
    rope = {"rope_type": "default", "rope_theta": float(c.get("rope_base", 10000))}
    adj = c.get("rope_adjustments")
    if not adj:
        return rope
    if isinstance(adj, dict) and {"low_freq_factor", "high_freq_factor", "factor", "original_max_seq_len"} <= set(adj) \
            and not {"beta_fast", "beta_slow"} & set(adj):
        return {**rope, "rope_type": "llama3", "factor": float(adj["factor"]),
                "low_freq_factor": float(adj["low_freq_factor"]), "high_freq_factor": float(adj["high_freq_factor"]),
                "original_max_position_embeddings": int(adj["original_max_seq_len"])}
    off.append(f"rope_adjustments={adj!r} (only litgpt's llama3 adjustment is mapped)")
    return rope


# ---------------------------------------------------------------------------------------------- tensors


def _deinterleave_groups(w: torch.Tensor, c: dict) -> torch.Tensor:
    """Legacy `attn.attn` rows, per query group [q x q_per_kv, k, v], -> [all q, all k, all v] (what litgpt's own
    loader does to them before its forward)."""
    g, hs = c["n_query_groups"], c["head_size"]
    q_per_kv = c["n_head"] // g
    per = w.reshape(g, (q_per_kv + 2) * hs, *w.shape[1:])
    q = per[:, : q_per_kv * hs].reshape(-1, *w.shape[1:])
    k = per[:, q_per_kv * hs: (q_per_kv + 1) * hs].reshape(-1, *w.shape[1:])
    v = per[:, (q_per_kv + 1) * hs:].reshape(-1, *w.shape[1:])
    return torch.cat((q, k, v))


def _split_qkv(w: torch.Tensor, c: dict):
    hs = c["head_size"]
    return w.split((c["n_head"] * hs, c["n_query_groups"] * hs, c["n_query_groups"] * hs))


def _per_head_qkv(w: torch.Tensor, c: dict) -> torch.Tensor:
    """[all q, all k, all v] rows -> transformers GPT-NeoX's per-head [q, k, v] rows (litgpt's qkv_reassemble)."""
    q, k, v = _split_qkv(w, c)
    hs = c["head_size"]
    return torch.cat([t for trio in zip(q.split(hs), k.split(hs), v.split(hs)) for t in trio])


def convert_state(state: dict[str, torch.Tensor], c: dict, path: Path) -> dict[str, torch.Tensor]:
    """litgpt GPT tensors -> transformers names and layouts (works on meta tensors; views where it can)."""
    llama = c["mlp_class_name"] == "LLaMAMLP"
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        top = (LLAMA_TOP if llama else NEOX_TOP).get(key)
        if top is not None:
            out[top] = t
            continue
        parts = key.split(".")
        if len(parts) < 5 or parts[:2] != ["transformer", "h"] or not parts[2].isdigit():
            raise _unknown(key, path)
        i, rest = parts[2], ".".join(parts[3:])
        prefix = f"model.layers.{i}." if llama else f"gpt_neox.layers.{i}."
        module, _, kind = rest.rpartition(".")
        if module in ("attn.qkv", "attn.attn"):
            if module == "attn.attn":
                t = _deinterleave_groups(t, c)
            if llama:
                if kind != "weight":
                    raise _unknown(key, path)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(t, c)):
                    out[f"{prefix}self_attn.{name}.weight"] = part
            else:
                out[f"{prefix}attention.query_key_value.{kind}"] = _per_head_qkv(t, c)
        elif llama and rest in LLAMA_LAYER:
            out[prefix + LLAMA_LAYER[rest]] = t
        elif not llama and module in NEOX_LAYER and kind in ("weight", "bias"):
            out[f"{prefix}{NEOX_LAYER[module]}.{kind}"] = t
        else:
            raise _unknown(key, path)
    return out


def _unknown(key: str, path: Path) -> CkptEvalError:
    if "lora_" in key:
        return CkptEvalError(f"litgpt checkpoint {path} holds LoRA weights ({key}): merge them first with litgpt's "
                             "`litgpt merge_lora`, then point ckpt= at the merged dir")
    if "adapter" in key or "gating_factor" in key:
        return CkptEvalError(f"litgpt checkpoint {path} holds adapter weights ({key}), which have no transformers "
                             "counterpart: merge or convert them with litgpt first")
    return CkptEvalError(f"litgpt checkpoint {path} holds {key}, which has no place in the transformers model its "
                         "model_config.yaml maps to: convert it with `litgpt convert_from_litgpt`")


# ---------------------------------------------------------------------------------------------- the family


class LitGPTFormat(CheckpointFormat):
    name = "litgpt"
    description = ("a litgpt step dir (lit_model.pth + model_config.yaml, as its pretrain/finetune loops write), or "
                   "its lit_model.pth")

    @staticmethod
    def _dir(path: Path) -> Path:
        return path if path.is_dir() else path.parent

    @staticmethod
    def _pth(path: Path) -> Path:
        return path / FILE if path.is_dir() else path

    def looks_like(self, path: Path) -> bool:
        path = Path(path)
        if path.is_file():
            return path.suffix == ".pth" and (path.parent / CONFIG).is_file()
        if not path.is_dir():
            return False
        # lit_model.pth is written first, model_config.yaml last: either one makes the dir ours (complete or not)
        return (path / FILE).is_file() or ((path / CONFIG).is_file() and not any(path.glob("*.safetensors")))

    def check_complete(self, path: Path) -> None:
        path = Path(path)
        d, pth = self._dir(path), self._pth(path)
        if not pth.is_file() and (d / f"{FILE}.lora").is_file():
            raise CkptEvalError(f"litgpt checkpoint {d} holds LoRA weights only ({FILE}.lora): merge them into the "
                                "base with litgpt's `litgpt merge_lora`, then point ckpt= at the merged dir")
        if not pth.is_file():
            raise CkptEvalError(f"litgpt checkpoint {d} is incomplete: {pth.name} is missing (still being written?)")
        if not (d / CONFIG).is_file():
            raise CkptEvalError(f"litgpt checkpoint {d} is incomplete: {CONFIG} is missing (litgpt writes it after "
                                f"{FILE}: still being written?)")
        read_yaml(d / CONFIG)
        read_lit(pth)  # a partial zip (torch.save writes its directory last) is refused here

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        path = Path(path)
        d = self._dir(path)
        data = read_lit(self._pth(path))
        step = _common.int_or_none(data.get("step_count"))
        iters = _common.int_or_none(data.get("iter_num"))
        hp = read_yaml(d / HPARAMS) if (d / HPARAMS).is_file() else {}
        train = hp.get("train") if isinstance(hp.get("train"), dict) else {}
        per_iter = [_common.int_or_none(train.get("micro_batch_size")),
                    _common.int_or_none(train.get("max_seq_length"))
                    or _common.int_or_none(read_yaml(d / CONFIG).get("block_size")),
                    _common.int_or_none(hp.get("devices")), _common.int_or_none(hp.get("num_nodes", 1))]
        tokens = iters * per_iter[0] * per_iter[1] * per_iter[2] * per_iter[3] if iters and all(per_iter) else None
        return step, tokens

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        """The step dir (litgpt copies the tokenizer into it), the out dir, then hyperparameters' tokenizer_dir."""
        d = self._dir(Path(path))
        dirs = [d, d.parent]
        hp = read_yaml(d / HPARAMS) if (d / HPARAMS).is_file() else {}
        if isinstance(hp.get("tokenizer_dir"), str):
            dirs.append(Path(hp["tokenizer_dir"]))
        return dirs

    def hf_config_dir(self, path: Path) -> Path | None:
        return None  # model_config.yaml is the architecture; a config.json litgpt copied beside it is not read

    def _config(self, path: Path) -> tuple[dict, Path]:
        source = self._dir(Path(path)) / CONFIG
        return resolved_config(read_yaml(source), source), source

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        path = Path(path)
        cfg, source = self._config(path)
        config = hf_config_from_litgpt(read_yaml(source), source)
        arch = Architecture(config, f"litgpt {CONFIG} in {source.parent} ({cfg.get('name') or 'unnamed'}, "
                                    f"{cfg['mlp_class_name']} -> {config.architectures[0]})")
        _common.check_shapes(config, self.tensor_specs(path, config), arch.source, path)
        return arch

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        path = Path(path)
        cfg, _ = self._config(path)
        meta = {k: torch.empty(v.shape, device="meta") for k, v in _state(self._pth(path)).items()}
        try:
            return {k: tuple(v.shape) for k, v in convert_state(meta, cfg, path).items()}
        except RuntimeError as exc:  # a fused tensor whose rows do not split as the config says
            raise CkptEvalError(f"litgpt checkpoint {path} does not fit its {CONFIG} ({_common.one_line(exc)}): "
                                f"the config describes another model") from None

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        path = Path(path)
        cfg, _ = self._config(path)
        state = convert_state(_state(self._pth(path)), cfg, path)
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}  # off the mmap
