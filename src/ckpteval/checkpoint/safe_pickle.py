"""Read every pickle a checkpoint holds without letting it run code.

A pickle names callables (`GLOBAL module name`) that the loader calls while reading; a crafted file can name
`os.system`. Two readers here, one per kind of pickle, each refusing anything off an explicit allow-list before
calling it:

- DCP `.metadata` (torch's `FileSystemReader.read_metadata` uses plain `pickle.load`): `load_dcp_metadata` and
  `SafeFileSystemReader` (drop-in for `FileSystemReader` in `dcp.load`) accept only the DCP metadata classes,
  torch sizes / dtypes / layouts, `pathlib` paths and builtins. Trainers whose own DCP writer pickles its own
  plain-data storage class (OLMo-core's `_StorageInfo`: relative_path, offset, length) get torch's equivalent
  class in its place (`DCP_METADATA_ALIASES`): the trainer's module is never imported.
- torch-saved files (`.pt`, `.bin`, `.ckpt`, Megatron's `common.pt`): `torch_load` lists the file's globals
  first (`get_unsafe_globals_in_checkpoint` reads them without unpickling), refuses any that neither torch's
  `weights_only` unpickler nor our extra allow-list takes, then loads with `weights_only=True`.

A refused file is one `CkptEvalError` naming the file and the global it asked for; nothing in it was called.
"""

from __future__ import annotations

import io
import pickle
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from ckpteval.errors import CkptEvalError

DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                               "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                               "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"ExtensionRegistry"},
    # Megatron-Core's torch_dist saver keeps its save plans in `.metadata` (planner_data): plain dataclasses/enum
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
    "copyreg": {"_reconstructor"},
}
# (module, name) a trainer's DCP writer pickles -> torch's own class with the same fields, built in its place.
DCP_METADATA_ALIASES = {
    # OLMo-core's RemoteFileSystemWriter: a dataclass (relative_path, offset, length), as torch's
    ("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"): ("torch.distributed.checkpoint.filesystem",
                                                                      "_StorageInfo"),
}


class Inert:
    """Stand-in for a framework's own class named inside a pickle (DeepSpeed's LossScaler and ZeroStageEnum in its
    optimizer states, ...): it takes the pickled arguments and state and runs nothing, so the file is read without
    importing the framework or calling anything the file names. Passed to `torch_load` as an extra global."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class RefusedPickle(CkptEvalError):
    """A pickle asked for a global that is not on the allow-list (it was not called)."""


def _refusal(path: str | Path, global_name: str, what: str) -> RefusedPickle:
    return RefusedPickle(f"refusing to unpickle {path}: it asks for {global_name}, which is not a known {what} "
                         "(ckpteval's allow-list; a checkpoint file must never run code, so nothing in it was "
                         "called). If your trainer's own saver wrote this file, ckpteval does not read that "
                         "trainer's format yet: export the weights with the trainer's own Hugging Face / safetensors "
                         "exporter and point ckpt= at that")


def _torch_attr_allowed(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = DCP_METADATA_ALIASES.get((module, name), (module, name))
        if name in DCP_METADATA_CLASSES.get(module, ()) or (module == "torch" and _torch_attr_allowed(name)):
            return super().find_class(module, name)
        raise _refusal(self.source, f"{module}.{name}", "checkpoint storage or metadata class")


def load_dcp_metadata(path: str | Path):
    """The `Metadata` object of a DCP `.metadata` file (or of the dir holding it), read with the allow-list."""
    path = Path(path)
    if path.is_dir():
        path = path / ".metadata"
    data = path.read_bytes()
    return _unpickle_dcp_metadata(data, str(path))


def _unpickle_dcp_metadata(data: bytes, source: str):
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        metadata = _DCPMetadataUnpickler(io.BytesIO(data), source).load()
    except RefusedPickle:
        raise
    except Exception as exc:  # noqa: BLE001 - a half-written pickle raises anything from EOFError to KeyError
        raise CkptEvalError(f"checkpoint {Path(source).parent} is incomplete: {Path(source).name} is unreadable "
                            f"({type(exc).__name__}): it is still being written, or the save crashed") from None
    if not isinstance(metadata, Metadata):
        raise CkptEvalError(f"checkpoint {Path(source).parent}: {Path(source).name} is not DCP metadata "
                            f"(it holds a {type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_filesystem_reader(path: str | Path):
    """A `torch.distributed.checkpoint.FileSystemReader` whose `.metadata` is read with the allow-list."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                metadata = _unpickle_dcp_metadata(f.read(), str(meta_path))
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


_LOAD_LOCK = threading.Lock()


@contextmanager
def _only_these_safe_globals(extra: list[tuple[Any, str]]):
    """torch's process-wide safe-globals set holds exactly `extra` for the duration: whatever an imported library
    registered (Megatron-Core adds numpy's `_reconstruct`/`ndarray`/`dtype` at import) neither widens our
    allow-list nor takes precedence over our stand-ins. Restored afterwards."""
    from torch.serialization import add_safe_globals, clear_safe_globals, get_safe_globals

    with _LOAD_LOCK:
        before = get_safe_globals()
        clear_safe_globals()
        add_safe_globals(extra)
        try:
            yield
        finally:
            clear_safe_globals()
            add_safe_globals(before)


def torch_load(path: str | Path, extra_globals: Iterable[tuple[Any, str]] = (), inert: tuple[str, ...] = (),
               **kwargs) -> Any:
    """`torch.load(path, weights_only=True)` after refusing any global outside torch's own weights-only set and
    `extra_globals` ((stand-in object, "module.Name") pairs: e.g. a plain dict for Lightning's AttributeDict).
    Globals whose module starts with one of `inert` (e.g. "deepspeed.", "numpy.") are read as `Inert` stand-ins:
    the values are kept, nothing is called or imported. Globals other libraries registered process-wide with
    `torch.serialization.add_safe_globals` are not part of the allow-list.
    Non-zip (legacy) pickles go straight to the weights-only unpickler, which refuses unknown globals itself."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint

    path = Path(path)
    extra = list(extra_globals)
    with _only_these_safe_globals([]):
        try:
            asked = get_unsafe_globals_in_checkpoint(str(path))  # outside torch's built-in set
        except Exception:  # noqa: BLE001 - not a zip archive: the weights-only unpickler checks as it reads
            asked = []
    allowed = {name for _, name in extra}
    unlisted = [name for name in asked if name not in allowed]
    extra += [(Inert, name) for name in unlisted if name.startswith(inert)]
    refused = [name for name in unlisted if not name.startswith(inert)]
    if refused:
        raise _refusal(path, refused[0], "tensor or plain-data type")
    try:
        with _only_these_safe_globals(extra):
            return torch.load(str(path), map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        marker = "Unsupported global: GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            raise _refusal(path, name, "tensor or plain-data type") from None
        raise CkptEvalError(f"checkpoint file {path} is not a readable torch file ({text.splitlines()[0][:200]}): "
                            "it is truncated, corrupt or not a checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
        raise CkptEvalError(f"checkpoint file {path} is not a readable torch file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): it is truncated, corrupt or "
                            "not a checkpoint") from None
