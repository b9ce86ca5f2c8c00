"""Weight-update payloads: SGLang's wire format, an allow-list decoder, buckets and /dev/shm care.

SGLang's `update_weights_from_tensor` takes, per engine TP rank, the base64 text of a
`ForkingPickler` pickle of either a list of `(name, tensor)` pairs (`load_format=None`) or a dict
`{"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata, ...]}`
(`load_format="flattened_bucket"`; each entry's `start_idx`/`end_idx`/`numel` count bytes of the
flat tensor). ForkingPickler moves CPU tensors into shared memory and pickles only a file name,
which is what makes a multi-GB update cheap over HTTP. That needs the "file_system" sharing
strategy (a file descriptor cannot cross HTTP), and each shared tensor leaves a
`/dev/shm/torch_<pid>_*` file behind when a reference is never dropped. The rule that keeps the
count right: an engine that answers success consumed the payload (its decode dropped the
reference pickling added); any other outcome (a refusal, an unreachable engine) leaves that
reference to the sender, which drops it (`SharedPayload.release(delivered=False)`). SGLang refuses
before decoding (no open session); the CPU engine does too, and when it refuses a payload it has
already decoded it hands the references back (`DecodedPayload.refuse`). An engine may keep the
files a sender reuses mapped between updates (`KeptMappings`). Files of killed processes are
shm.py's business.

This module owns encoding and decoding only. Decoding uses an allow-list unpickler: anything
outside a fixed set of torch rebuild functions, dtypes and the metadata class is refused, so a
bad payload is an error, never code execution. It never loads weights into a model.
"""
from __future__ import annotations

import base64
import binascii
import io
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable

import torch
import torch.multiprocessing

from or1_megatron.errors import OR1Error

SGLANG_METADATA_MODULE = "sglang.srt.weight_sync.tensor_bucket"
# Every tensor of a flattened bucket starts on a 16-byte boundary, so a receiver can view its
# bytes as any dtype without a copy (SGLang reads start_idx/end_idx: the padding is invisible).
ALIGN = 16


class PayloadError(OR1Error):
    """A weight payload cannot be decoded: bad base64, a refused global, or a wrong structure."""


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lives in a flattened bucket (SGLang's fields; offsets in bytes)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def _metadata_class() -> type:
    """SGLang's class when SGLang is installed: its allow-list refuses any other class."""
    try:
        import importlib

        return importlib.import_module(SGLANG_METADATA_MODULE).FlattenedTensorMetadata
    except ImportError:
        return FlattenedTensorMetadata


def use_file_system_sharing() -> None:
    """CPU tensors crossing processes over HTTP need shared-memory files, not fds."""
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


# ---------------------------------------------------------------- encoding (trainer side)


def aligned(offset: int) -> int:
    """The first ALIGN boundary at or after `offset`."""
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def flatten_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Pack tensors of any dtypes into one uint8 tensor plus per-tensor byte ranges."""
    if not named_tensors:
        raise ValueError("cannot build an empty bucket")
    cls = _metadata_class()
    flats, metadata, offset = [], [], 0
    for name, tensor in named_tensors:
        pad = aligned(offset) - offset
        if pad:
            flats.append(torch.zeros(pad, dtype=torch.uint8, device=tensor.device))
            offset += pad
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        metadata.append(cls(name=name, shape=tensor.shape, dtype=tensor.dtype,
                            start_idx=offset, end_idx=offset + flat.numel(), numel=flat.numel()))
        flats.append(flat)
        offset += flat.numel()
    return {"flattened_tensor": torch.cat(flats), "metadata": metadata}


def split_into_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                       bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor goes alone)."""
    buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, tensor))
        size += nbytes
    return [bucket for bucket in buckets if bucket]


def unflatten_bucket(bucket: Any) -> list[tuple[str, torch.Tensor]]:
    """Inverse of flatten_bucket; checks every byte range against the flat tensor."""
    if not isinstance(bucket, dict) or set(bucket) != {"flattened_tensor", "metadata"}:
        raise PayloadError("a flattened_bucket payload must be a dict with keys "
                           "'flattened_tensor' and 'metadata'")
    flat, metadata = bucket["flattened_tensor"], bucket["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise PayloadError("flattened_tensor must be a 1-D tensor")
    flat = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    out = []
    for meta in metadata:
        if not isinstance(meta, FlattenedTensorMetadata):
            raise PayloadError(f"bucket metadata entry of type {type(meta).__name__}")
        size = meta.shape.numel() * meta.dtype.itemsize
        if not (0 <= meta.start_idx and meta.end_idx - meta.start_idx == size
                and meta.end_idx <= flat.numel()):
            raise PayloadError(
                f"tensor {meta.name!r}: byte range [{meta.start_idx}, {meta.end_idx}) does not "
                f"hold shape {tuple(meta.shape)} of {meta.dtype} in a bucket of {flat.numel()} bytes"
            )
        chunk = flat[meta.start_idx:meta.end_idx]
        if meta.start_idx % meta.dtype.itemsize:  # an unaligned sender: copy before the view
            chunk = chunk.clone()
        out.append((meta.name, chunk.view(meta.dtype).reshape(meta.shape)))
    return out


def serialize(obj: Any) -> str:
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True), with CUDA tensors'
    devices written as GPU UUIDs (what SGLang's monkey_patch_torch_reductions expects: the
    engine's CUDA_VISIBLE_DEVICES numbers its GPUs differently from the trainer's)."""
    use_file_system_sharing()
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    pickler.dispatch_table = {**pickler.dispatch_table, torch.Tensor: _reduce_tensor_by_uuid,
                              torch.nn.Parameter: _reduce_tensor_by_uuid}
    pickler.dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Position of the device in the arguments of torch's rebuild_cuda_tensor (stable for years;
# SGLang relies on it too).
_CUDA_DEVICE_ARG = 6


def _reduce_tensor_by_uuid(tensor: torch.Tensor) -> tuple[Any, tuple]:
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        device = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], device, *args[_CUDA_DEVICE_ARG + 1:])
    return rebuild, args


def _rebuild_cuda_tensor_by_uuid(*args: Any) -> torch.Tensor:
    """torch's rebuild_cuda_tensor for a handle whose device is a GPU UUID (or an index)."""
    from torch.multiprocessing import reductions

    device = args[_CUDA_DEVICE_ARG]
    if isinstance(device, str):
        uuids = [str(torch.cuda.get_device_properties(i).uuid)
                 for i in range(torch.cuda.device_count())]
        if device not in uuids:
            raise PayloadError(f"a CUDA IPC handle of GPU {device}, which this engine does not "
                               f"see (CUDA_VISIBLE_DEVICES): a colocated engine must get "
                               "handles from the trainer rank on its own GPU")
        args = (*args[:_CUDA_DEVICE_ARG], uuids.index(device), *args[_CUDA_DEVICE_ARG + 1:])
    return reductions.rebuild_cuda_tensor(*args)


def pickled_storages(tensors: Iterable[torch.Tensor]) -> list[Any]:
    """The shared storages a pickle of `tensors` adds one reference to each: one per distinct
    CPU storage (a pickle shares a storage once, however many tensors view it), empty ones
    too (the file_system strategy counts those as well)."""
    storages = {}
    for tensor in tensors:
        if not tensor.is_cuda:
            storage = tensor.untyped_storage()
            storages.setdefault(storage._cdata, storage)
    return list(storages.values())


def drop_pickled_references(storages: list[Any]) -> None:
    """Drop the references one pickle added, for a pickle that no receiver will load."""
    for storage in storages:
        storage._shared_decref()


class SharedPayload:
    """One engine's `serialized_named_tensors` entry and the shared memory behind it.

    torch reference-counts each shared-memory file inside the file: pickling adds one reference
    for the receiver, which the receiver drops when it decodes the payload; the file is unlinked
    when the last mapping closes. A payload that never reaches a decoder (the engine was down)
    would keep that reference forever and leak the file, so the sender says whether the engine
    answered: `release(delivered=False)` drops the receiver's reference here. (Never unlink these files by
    hand while a process maps them: torch aborts that process when its own unlink fails.)

    Only a success answer means delivered (see the module docstring)."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], load_format: str | None,
                 copies: int = 1):
        use_file_system_sharing()
        if load_format == "flattened_bucket":
            obj: Any = flatten_bucket(named_tensors)
            tensors = [obj["flattened_tensor"]]
        elif load_format is None:
            # Clone: pickling moves a CPU tensor's storage into shared memory in place, which
            # must not happen to the trainer's own parameters.
            obj = [(name, t.detach().clone()) for name, t in named_tensors]
            tensors = [t for _, t in obj]
        else:
            raise ValueError(f"unknown load_format {load_format!r}")
        self._seal(obj, tensors, load_format, copies)

    @classmethod
    def of_views(cls, named_tensors: list[tuple[str, torch.Tensor]],
                 copies: int = 1) -> "SharedPayload":
        """A named-tensor payload of tensors whose storage is in shared memory already (or may
        move there in place): no copy, the engine reads them where they are."""
        payload = cls.__new__(cls)
        payload._seal(list(named_tensors), [t for _, t in named_tensors], None, copies)
        return payload

    @classmethod
    def of_flattened(cls, bucket: dict[str, Any], copies: int = 1) -> "SharedPayload":
        """A payload of an already flattened bucket, without copying it (the weight sync keeps
        its bucket buffer in shared memory, so serialising passes only its file name)."""
        payload = cls.__new__(cls)
        payload._seal(bucket, [bucket["flattened_tensor"]], "flattened_bucket", copies)
        return payload

    def _seal(self, obj: Any, tensors: list[torch.Tensor], load_format: str | None,
              copies: int) -> None:
        use_file_system_sharing()
        self.load_format = load_format
        # One pickle per engine TP rank: each rank's decode drops the reference its pickle added.
        self.texts = [serialize(obj) for _ in range(copies)]
        self._storages = pickled_storages(tensors)

    def release(self, delivered: bool) -> None:
        """Drop the payload; `delivered=False` if no engine ever decoded it."""
        if not delivered:
            for _ in self.texts:
                drop_pickled_references(self._storages)
        self._storages = []


# ---------------------------------------------------------------- decoding (engine side)

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
           "uint8", "bool", "float8_e4m3fn", "float8_e5m2")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch.multiprocessing.reductions", "rebuild_tensor"): None,
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"): None,
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"): None,
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"): None,
    # CUDA IPC handles (a GPU engine): the device may be a GPU UUID, as SGLang sends it.
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _rebuild_cuda_tensor_by_uuid,
    ("torch._utils", "_rebuild_tensor_v2"): None,
    ("torch", "Tensor"): None,
    ("torch", "Size"): None,
    ("torch.storage", "UntypedStorage"): None,
    ("torch.storage", "TypedStorage"): None,
    ("torch", "UntypedStorage"): None,
    ("collections", "OrderedDict"): None,
    ("builtins", "list"): None,
    ("builtins", "tuple"): None,
    ("builtins", "dict"): None,
    # Both spellings of the bucket metadata decode to our class.
    (__name__, "FlattenedTensorMetadata"): FlattenedTensorMetadata,
    (SGLANG_METADATA_MODULE, "FlattenedTensorMetadata"): FlattenedTensorMetadata,
}
_ALLOWED.update({("torch", name): None for name in _DTYPES})


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        # Every shared storage rebuilt, once per occurrence, with its file's handle: each
        # rebuild dropped one reference the sender's pickling added, which a refusal must hand back.
        self.taken: list[tuple[bytes, Any]] = []

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in _ALLOWED:
            hint = ""
            if name == "rebuild_storage_fd":
                hint = (" (the sender used the file_descriptor sharing strategy; call "
                        "torch.multiprocessing.set_sharing_strategy('file_system') before encoding)")
            raise PayloadError(f"payload refers to {module}.{name}, which is not allowed{hint}")
        if name == "rebuild_storage_filename":
            return _recording_rebuild(self.taken)
        return _ALLOWED[key] or super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise PayloadError("payload uses persistent ids, which are not allowed")


def _recording_rebuild(taken: list[tuple[bytes, Any]]) -> Callable[..., Any]:
    """torch's rebuild_storage_filename, recording each (handle, storage) in `taken`. A closure, not a
    bound method: the unpickler keeps what find_class returns, and a cycle through it would
    keep the payload mapped (and its file alive) until the garbage collector ran."""
    from torch.multiprocessing.reductions import rebuild_storage_filename

    def rebuild(cls: Any, manager: Any, handle: bytes, *size_dtype: Any) -> Any:
        storage = rebuild_storage_filename(cls, manager, handle, *size_dtype)
        taken.append((handle, storage))
        return storage

    return rebuild


@dataclass
class DecodedPayload:
    """A decoded payload's tensors, and the shared storages whose sender references it took."""

    named: list[tuple[str, torch.Tensor]]
    taken: list[tuple[bytes, Any]]  # (file handle, storage) per shared storage rebuilt

    def refuse(self) -> None:
        """Hand the sender's references back (the engine refuses it after decoding): the sender,
        told by the refusal that nothing was delivered, drops them itself."""
        _give_back(self.taken)
        self.taken = []


def _give_back(taken: list[tuple[bytes, Any]]) -> None:
    for _, storage in taken:
        storage._shared_incref()


class KeptMappings:
    """Engine side: keeps mapped, from one update session to the next, the shared-memory files
    a sender writes every time.

    Mapping a payload's file and faulting its pages in costs about as much as copying the bytes
    out (on CPU, a third of a colocated sync). The weight sender reuses the same files on every
    sync (its bucket buffers, the trainer's parameters), so a file seen in two consecutive
    sessions stays mapped: torch's shared_cache then hands its storage back to the next decode
    without a new mapping. A kept file that a session does not use is let go at that session's
    end, so a buffer its sender freed outlives it by one session at most; payloads built fresh
    for one call (a new file name each time) are never kept. A file of a sender that was killed
    stays behind once let go (its sender's own reference is never dropped): whoever lets go
    sweeps such files (shm.remove_stale_shm_files)."""

    def __init__(self) -> None:
        self._kept: dict[bytes, Any] = {}
        self._last_session: set[bytes] = set()
        self._session: set[bytes] = set()

    def used(self, payload: DecodedPayload) -> None:
        """A payload the engine consumed in the open session."""
        for handle, storage in payload.taken:
            self._session.add(handle)
            if handle in self._last_session or handle in self._kept:
                self._kept[handle] = storage

    def end_session(self) -> int:
        """Let go of the kept files this session did not use; how many."""
        unused = len(self._kept.keys() - self._session)
        self._kept = {h: s for h, s in self._kept.items() if h in self._session}
        self._last_session, self._session = self._session, set()
        return unused

    @property
    def kept(self) -> int:
        """How many files are mapped across sessions now."""
        return len(self._kept)


def _unpickle(text: str | bytes) -> tuple[Any, list[tuple[bytes, Any]]]:
    """One `serialized_named_tensors` entry (base64 text or raw pickle bytes) -> (object, the
    shared storages taken). On failure the sender keeps its references."""
    use_file_system_sharing()
    if isinstance(text, str):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"payload is not valid base64: {exc}") from None
    else:
        data = text
    unpickler = _AllowListUnpickler(io.BytesIO(data))
    try:
        return unpickler.load(), unpickler.taken
    except PayloadError:
        _give_back(unpickler.taken)
        raise
    except Exception as exc:  # truncated data, missing shm file, ... : all answer as errors
        _give_back(unpickler.taken)
        raise PayloadError(f"payload cannot be unpickled: {type(exc).__name__}: {exc}") from None


def decode_payload(text: str | bytes, load_format: str | None) -> DecodedPayload:
    """Decode a payload into `(name, tensor)` pairs, checking its structure; a payload refused
    here hands its references back to the sender."""
    obj, taken = _unpickle(text)
    try:
        if load_format == "flattened_bucket":
            named = unflatten_bucket(obj)
        elif isinstance(obj, (list, tuple)):
            named = list(_check_pairs(obj))
        else:
            raise PayloadError(f"a named-tensor payload must be a list of (name, tensor), "
                               f"got {type(obj).__name__}")
    except PayloadError:
        _give_back(taken)
        raise
    return DecodedPayload(named, taken)


def decode_named_tensors(text: str | bytes, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """`decode_payload` for a receiver that always consumes the payload."""
    return decode_payload(text, load_format).named


def _check_pairs(items: Iterable[Any]) -> Iterable[tuple[str, torch.Tensor]]:
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise PayloadError(f"payload entry {i} is not a (name, tensor) pair")
        yield item[0], item[1]
