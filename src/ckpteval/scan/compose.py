"""A scan's job configs without composing each one from scratch.

Hydra composes every job of a sweep afresh (`ConfigLoader.load_sweep_config`): read the defaults tree, merge
every config, apply the overrides. That is ~0.12-0.14 s a job on 2 CPU cores, a fifth of an adapter scan's
per-checkpoint cost beyond the model's forwards. The jobs of a checkpoint scan differ in one plain value
(`ckpt=PATH`): the same groups, the same configs, the same other overrides. `ReusedComposition` wraps the
scan's config loader: the first job is composed by Hydra; a later job whose overrides differ from that one only
in plain values (no group choice, no dict or list, each such key overridden once and by nothing around it) is a
copy of that composition with Hydra's own steps redone for what differs: its override applier on the changed
values, `hydra.overrides.task` and `hydra.job.override_dirname` (Hydra's `get_overrides_dirname`), the working
dir, and the master config's resolver cache. Anything else, or anything unexpected, is composed by Hydra.
`tests/test_sweep.py` checks that every reused config equals Hydra's own composition of it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ReusedComposition:
    """A config loader (everything delegated to Hydra's) whose `load_sweep_config` reuses the last composition
    Hydra made when only plain values differ. `reused` counts the jobs that were not composed afresh."""

    def __init__(self, loader: Any):
        self._loader = loader
        self._last: tuple[Any, list, DictConfig] | None = None  # (master config, parsed overrides, pristine copy)
        self.reused = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_loader":  # unpickling (submitit ships the launcher): not set yet
            raise AttributeError(name)
        return getattr(self._loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
        try:
            reused = self._reuse(master_config, parsed)
        except Exception:  # noqa: BLE001 - a bad value, or a Hydra that changed: Hydra composes (and says what)
            reused = None
        if reused is not None:
            self.reused += 1
            return reused
        config = self._loader.load_sweep_config(master_config, sweep_overrides)
        # the launcher writes the job's id, number and output dir into what it gets: keep a copy of Hydra's result
        self._last = (master_config, parsed, copy.deepcopy(config))
        return config

    def _reuse(self, master_config: DictConfig, parsed: list) -> DictConfig | None:
        if self._last is None or self._last[0] is not master_config or len(self._last[1]) != len(parsed):
            return None
        _, before, composed = self._last
        if composed.hydra.job.env_copy:  # copied from the environment at composition time
            return None
        changed = [i for i, (old, new) in enumerate(zip(before, parsed)) if old.input_line != new.input_line]
        if not all(_plain_value(before[i], parsed[i], composed) for i in changed):
            return None
        keys = [o.key_or_group for o in parsed]
        for i in changed:  # nothing else may touch a changed key (set twice, or a dict merged over it)
            if any(_overlap(keys[i], key) for j, key in enumerate(keys) if j != i):
                return None
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        config = copy.deepcopy(composed)
        ConfigLoaderImpl._apply_overrides_to_config([parsed[i] for i in changed], config)
        app = [o for o in parsed if not o.is_hydra_override()]
        config.hydra.overrides.task = [o.input_line for o in app]
        names = config.hydra.job.config.override_dirname
        config.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=names.kv_sep, item_sep=names.item_sep, exclude_keys=names.exclude_keys)
        config.hydra.runtime.cwd = os.getcwd()
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config


def _plain_value(old: Any, new: Any, composed: DictConfig) -> bool:
    """`key=value` both times, the same key, not Hydra's own, not a config group, a scalar value."""
    from hydra.core.override_parser.types import OverrideType, ValueType

    if old.key_or_group != new.key_or_group or new.is_hydra_override():
        return False
    if any(o.type != OverrideType.CHANGE or o.package is not None or o.value_type != ValueType.ELEMENT
           for o in (old, new)):
        return False
    if new.key_or_group in composed.hydra.runtime.choices:
        return False
    return not any(isinstance(o.value(), (dict, list)) for o in (old, new))


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")
