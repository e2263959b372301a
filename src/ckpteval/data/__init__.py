"""Held-out and training data as token windows, for `data=local|hf|demo` (see `windows.py` for the order)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.distributed as dist

from ckpteval.data.windows import TokenWindows
from ckpteval.errors import CkptEvalError

_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class EvalSet:
    """One held-out set of a loss evaluation: `data` (metrics eval/...) or `eval.sets.NAME` (eval/NAME/...)."""

    name: str
    prefix: str
    windows: TokenWindows


def load_eval_windows(cfg, tokenizer) -> TokenWindows:
    """The held-out windows of the `data` set."""
    return _load(cfg, tokenizer, split=cfg.data.split, path=cfg.data.dataset_path, seq_len=cfg.eval.seq_len,
                 what="data.dataset_path")


def eval_set_configs(cfg) -> dict[str, object]:
    """`eval.sets` as typed DataConfigs (the schema checks field names, types and `kind`), with what only a whole
    set can say (its name, the field its kind needs): called by `job.validate_config`, before any work."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ckpteval.config import DataConfig

    out = {}
    sets = cfg.eval.get("sets") or {}
    for name in sets:
        try:  # interpolations (${paths.demo_data}, ${oc.env:VAR}) resolve against the whole config first
            raw = OmegaConf.to_container(sets[name], resolve=True) if OmegaConf.is_config(sets[name]) else sets[name]
            data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
        except OmegaConfBaseException as exc:
            msg = str(exc).splitlines()[0]
            raise CkptEvalError(f"eval.sets.{name} is not a data config ({msg}): use the fields of `data` "
                                f"(kind, dataset_path, file_pattern, dtype, name, config, split, text_field)") from None
        if not _SET_NAME.match(str(name)) or name == "data":
            raise CkptEvalError(f"eval.sets.{name}: a set name is letters, digits, '_', '.', '-' (and not 'data'): "
                                f"rename it")
        if data_cfg.kind == "local" and not data_cfg.dataset_path:
            raise CkptEvalError(f"eval.sets.{name} has no dataset_path: give the dir of its token shards "
                                f"('+eval.sets.{name}={{kind: local, dataset_path: DIR}}')")
        if data_cfg.kind == "hf" and not data_cfg.name:
            raise CkptEvalError(f"eval.sets.{name} has no name: give a save_to_disk dir, data files or a cached hub "
                                f"name ('+eval.sets.{name}={{kind: hf, name: DIR_OR_NAME}}')")
        out[str(name)] = data_cfg
    return out


def check_eval_sets(cfg) -> None:
    eval_set_configs(cfg)


def load_eval_sets(cfg, tokenizer) -> list[EvalSet]:
    """The `data` set and every `eval.sets.NAME`, windowed alike (eval.seq_len), in config order."""
    configs = eval_set_configs(cfg)
    sets = [EvalSet("data", "eval/", load_eval_windows(cfg, tokenizer))]
    for name, data_cfg in configs.items():
        if data_cfg.kind == "local":
            from ckpteval.data.local import load_local_windows

            windows = load_local_windows(data_cfg.dataset_path, data_cfg.file_pattern, data_cfg.dtype,
                                         cfg.eval.seq_len, f"eval.sets.{name}.dataset_path")
        else:
            from ckpteval.data.hf import load_hf_windows

            windows = _on_rank0(lambda d=data_cfg: load_hf_windows(d, d.split, tokenizer, cfg.eval.seq_len))
        sets.append(EvalSet(str(name), f"eval/{name}/", windows))
    return sets


def load_train_windows(cfg, tokenizer) -> TokenWindows:
    return _load(cfg, tokenizer, split=cfg.data.train_split, path=cfg.data.train_path, seq_len=cfg.train.seq_len,
                 what="data.train_path")


def _load(cfg, tokenizer, *, split: str, path: str | None, seq_len: int, what: str) -> TokenWindows:
    if cfg.data.kind == "local":
        from ckpteval.data.local import load_local_windows

        return load_local_windows(path, cfg.data.file_pattern, cfg.data.dtype, seq_len, what)
    from ckpteval.data.hf import load_hf_windows  # data.kind=hf (an Enum: nothing else composes)

    # Rank 0 tokenizes once and broadcasts the packed stream: ranks never disagree, the CPU work is not repeated.
    return _on_rank0(lambda: load_hf_windows(cfg.data, split, tokenizer, seq_len))


def _on_rank0(fn):
    """Run fn on rank 0 and share its result (or its error, so every rank fails together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # shared, then re-raised on every rank
            box[0] = ("err", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "err":
        raise value
    return value
