"""Shared fixtures: tiny tokenizers, models, checkpoints and datasets, all built offline in tmp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402

from tests import factories  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512) trained on a few lines of text, saved as an HF tokenizer dir."""
    return factories.make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_hf_ckpt(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny Llama saved as an HF dir (config.json + model.safetensors + tokenizer), at step 120."""
    root = tmp_path_factory.mktemp("ckpts")
    return factories.make_hf_checkpoint(root / "step_120", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_token_shards(tmp_path_factory):
    """Two uint16 .bin shards of random tokens < 512 (lengths 1000 and 777)."""
    return factories.make_token_shards(tmp_path_factory.mktemp("shards"))


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that starts run.py, torchrun or a server in a subprocess is `slow` even when its author
    forgot the marker (the fast default tier must stay fast)."""
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("slow") or item.get_closest_marker("scale"):  # own tier
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "run_cli(" in source or "torch.distributed.run" in source or "subprocess." in source:
            item.add_marker(pytest.mark.slow)
