"""What `mode=watch` checks before it looks at anything, and where its state lives.

Every problem a `watch.*` setting can have is one `error:` line at startup, not a failure on the first
checkpoint: no dir, intervals out of range, a plan that cannot run, held-out data that is not there. Choices
(`watch.order`, the kinds in `watch.plan`) are Enums, refused while composing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from ckpteval.errors import CkptEvalError
from ckpteval.watch.plan import validate_plan


def validate(cfg) -> None:
    w = cfg.watch
    if not w.dir:
        raise CkptEvalError("mode=watch needs the directory to watch: add watch.dir=PATH (or an fsspec URL such as "
                            "s3://bucket/run1)")
    if w.interval <= 0 or w.stable_s < 0 or w.backoff_s < 0 or w.lock_stale_s <= 0:
        raise CkptEvalError("watch.interval and watch.lock_stale_s must be > 0, watch.stable_s and "
                            "watch.backoff_s >= 0")
    if w.max_attempts < 1:
        raise CkptEvalError(f"watch.max_attempts={w.max_attempts}: use 1 or more")
    validate_plan(w)
    if "loss" in w.plan and cfg.data.kind == "local" and not cfg.data.demo:
        path = OmegaConf.select(cfg, "data.dataset_path", throw_on_missing=False, default=None)
        if path in (None, "???") or not Path(str(path)).expanduser().exists():
            raise CkptEvalError(f"watch.plan includes loss but data.dataset_path={path} does not exist: point it "
                                "at the held-out token shards (data.dataset_path=DIR)")


def default_state_dir(cfg) -> Path:
    """`watch.state_dir`, else `<watch.dir>/.ckpteval_watch`, else (a URL) `<paths.outputs>/watch/state_<hash>`."""
    if cfg.watch.state_dir:
        return Path(cfg.watch.state_dir).expanduser()
    if "://" in cfg.watch.dir and not cfg.watch.dir.startswith("file://"):
        digest = hashlib.sha256(cfg.watch.dir.encode()).hexdigest()[:12]
        return Path(cfg.paths.outputs) / "watch" / f"state_{digest}"
    local = cfg.watch.dir.removeprefix("file://")
    return Path(local).expanduser() / ".ckpteval_watch"
