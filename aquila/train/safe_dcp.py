"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP's FileSystemReader unpickles `.metadata` with plain pickle, and its DefaultLoadPlanner reads the non-tensor values
(the optimizer's param_groups) with torch.load(weights_only=False): a crafted checkpoint would run whatever its
pickles reduce to. SafeFileSystemReader unpickles the metadata through an allow-list of the classes DCP writes there,
and SafeLoadPlanner reads the values with torch.load(weights_only=True).
"""

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

# What a DCP .metadata pickle of this project's checkpoints refers to (torch 2.x; found by listing the globals of
# saved ones): the metadata dataclasses, the filesystem writer's storage records, torch.Size, dtypes and layouts, and
# the path type of the checkpoint id.
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the layout, nothing else
    ("collections", "OrderedDict"),
} | {
    (module, name)  # Python 3.13 moved the classes into pathlib._local
    for module in ("pathlib", "pathlib._local")
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
}


class MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{self.path}: refers to {module}.{name}, which DCP metadata never holds; "
                                     "not loading it")


def load_metadata(path: str) -> Metadata:
    with open(path, "rb") as handle:
        try:
            metadata = MetadataUnpickler(handle, path).load()
        except pickle.UnpicklingError:
            raise
        except Exception as error:  # truncated or garbled: still name the file
            raise pickle.UnpicklingError(f"{path}: not DCP metadata ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = load_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner.load_bytes (torch 2.x) with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
