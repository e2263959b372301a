"""No checkpoint file may run code: crafted pickles (DCP `.metadata`, `pytorch_model.bin`) are refused with one
`error:` line naming the file and the global, everywhere a checkpoint is read (detection, mode=loss, a -m glob
scan, the watcher), and the marker file the payload would create never appears."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ckpteval.checkpoint import check_complete, inspect_checkpoint
from ckpteval.checkpoint.safe_pickle import RefusedPickle, load_dcp_metadata, torch_load
from ckpteval.errors import CkptEvalError
from tests import factories


class _Payload:
    """Unpickling this calls os.system(touch MARKER): what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_dcp(tmp: Path, marker: Path) -> Path:
    """A real DCP dir whose `.metadata` is replaced by a pickle that runs a command."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp / "run" / "step_10"
    model = factories.make_model(seed=1)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    model.config.save_pretrained(ckpt.parent)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return ckpt


def test_dcp_metadata_payload_refused_by_detection(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = _malicious_dcp(tmp_path, marker)
    with pytest.raises(RefusedPickle, match=r"refusing to unpickle .*\.metadata: it asks for (posix|os)\.system"):
        load_dcp_metadata(ckpt)
    ok, reason = check_complete(ckpt)
    assert not ok and "refusing to unpickle" in reason
    with pytest.raises(CkptEvalError, match="refusing to unpickle"):
        inspect_checkpoint(ckpt)
    assert not marker.exists()


def test_real_dcp_metadata_still_reads(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = factories.make_model(seed=2)
    dcp.save({"model": model.state_dict(), "step": 3}, checkpoint_id=str(tmp_path / "step_3"), no_dist=True)
    meta = load_dcp_metadata(tmp_path / "step_3")
    assert "model.lm_head.weight" in meta.state_dict_metadata
    assert tuple(meta.state_dict_metadata["model.lm_head.weight"].size) == tuple(model.lm_head.weight.shape)


def test_bin_payload_refused_names_global(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, path)
    with pytest.raises(RefusedPickle, match=r"pytorch_model\.bin: it asks for (posix|os)\.system"):
        torch_load(path)
    assert not marker.exists()


def test_legacy_pickle_payload_refused(tmp_path):
    """A plain (non-zip) pickle saved as .pt goes through the weights-only unpickler, which refuses it too."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(CkptEvalError):
        torch_load(path)
    assert not marker.exists()


def test_garbage_bin_is_one_error(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(CkptEvalError, match="not a readable torch file"):
        torch_load(path)


class _RegisteredElsewhere:
    """A class some imported library registered process-wide with torch.serialization.add_safe_globals."""

    def __init__(self, value=None):
        self.value = value


@pytest.fixture
def library_registrations():
    """What Megatron-Core does at import (numpy's reconstructors, process-wide), plus a class of its own; the
    registrations are undone afterwards."""
    import numpy as np

    def called(*args, **kwargs):  # numpy's reconstructor as a library registered it: must never be reached
        called.count += 1
        return np.ndarray(0)

    called.count = 0
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([_RegisteredElsewhere, np.ndarray, np.dtype,
                                          (called, "numpy._core.multiarray._reconstruct"),
                                          (called, "numpy.core.multiarray._reconstruct")])
    yield called
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


def test_globals_registered_by_other_libraries_do_not_widen_the_allow_list(tmp_path, library_registrations):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2), "x": _RegisteredElsewhere(3)}, path)
    registered = set(map(str, torch.serialization.get_safe_globals()))
    with pytest.raises(RefusedPickle, match="_RegisteredElsewhere"):
        torch_load(path)
    assert set(map(str, torch.serialization.get_safe_globals())) == registered  # put back as it was


def test_numpy_rng_state_read_inert_whatever_was_registered(tmp_path, library_registrations):
    """An RNG state (numpy arrays) in a trainer's state file: refused unless the caller asks for numpy to be inert,
    and then read without calling any numpy reconstructor, the one a library registered included."""
    import numpy as np

    from ckpteval.checkpoint.safe_pickle import Inert

    path = tmp_path / "rank0.pt"
    torch.save({"rng": np.random.default_rng(0).bit_generator.state, "legacy": np.random.get_state(),
                "tokens": 123}, path)
    with pytest.raises(RefusedPickle, match="numpy"):
        torch_load(path)
    for _ in range(5):  # whichever order torch's global set iterates in
        data = torch_load(path, inert=("numpy.",))
        assert data["tokens"] == 123 and isinstance(data["legacy"][1], Inert)
    assert library_registrations.count == 0


@pytest.mark.slow
def test_payloads_never_run_from_the_cli(tmp_path, tiny_tokenizer_dir, tiny_token_shards):
    """mode=loss on a crafted DCP dir and on an HF dir with a crafted pytorch_model.bin, a -m glob scan over the
    DCP dirs, and the watcher: exit code, one error line, and no marker anywhere."""
    marker = tmp_path / "PWNED"
    ckpt = _malicious_dcp(tmp_path, marker)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", ckpt.parent / "tokenizer.json")
    hf = tmp_path / "hf" / "step_20"
    factories.make_hf_checkpoint(hf, tiny_tokenizer_dir)
    (hf / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(1), "x": _Payload(marker)}, hf / "pytorch_model.bin")
    common = ["data=local", f"data.dataset_path={tiny_token_shards}", "eval.seq_len=32", "eval.steps=1",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]

    for target in (ckpt, hf):
        res = factories.run_cli(["mode=loss", f"ckpt={target}", *common], cwd=tmp_path)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2, res.stderr[-2000:]
        assert len(errors) == 1 and "refusing to unpickle" in errors[0], res.stderr[-2000:]
        assert "Traceback" not in res.stderr

    res = factories.run_cli(["-m", "mode=loss", f"ckpt=glob:{tmp_path}/run/step_*", *common], cwd=tmp_path)
    assert "refusing to unpickle" in res.stdout + res.stderr

    res = factories.run_cli(["mode=watch", f"watch.dir={tmp_path / 'run'}", "watch.once=true", "watch.stable_s=0",
                             *common], cwd=tmp_path)
    assert "refusing to unpickle" in res.stdout + res.stderr
    assert not marker.exists()
