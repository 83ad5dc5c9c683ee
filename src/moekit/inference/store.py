"""The expert store: a moekit LM on disk, laid out for reading one expert at a time.

A store is a directory:

    index.json              format, format_version, the LMConfig, and one entry per blob
    resident.safetensors    every weight that is not a routed expert's (attention, norms,
                            embeddings, routers, shared experts), loaded whole
    experts-LLL.bin         one file per MoE layer (LLL = the block index): the layer's
                            experts as blobs, expert e at offset e · stride
    tokenizer.json          the run's tokenizer entry (optional)

Each (layer, expert) blob holds all of that expert's tensors back to back (each at a 64-byte
aligned offset inside the blob) and starts at a 4 KiB-aligned file offset, its length padded
to 4 KiB: one ``pread`` fetches an expert, and the read may bypass the page cache
(``O_DIRECT`` needs aligned offsets, lengths and buffers). safetensors sorts a file's tensors
by dtype and name, so an expert's rows of ``w_in`` and ``w_out`` are far apart in an ordinary
checkpoint: that is why the blob. Every blob carries a CRC-32 of its bytes, checked on read.

``experts_dtype`` (the index says which): "same" keeps the experts' tensors as they are;
"int8" / "int4" quantize each expert as it streams (moekit.inference.quant: int8 per output
channel, int4 in groups of 128 packed for this CPU's kernel), and a blob is then exactly the
expert's ``QuantizedExpert.to_bytes()`` (``QuantizedCodec``); the reader builds the
``QuantizedExpert`` on the read buffer without a copy.

``write_store(out, config, tensors)`` takes the model config and an iterator of
``(moekit name, tensor)`` in any order (a reader of a run directory or of a transformers
folder supplies it), and writes tensor by tensor: the peak memory is a small multiple of
the largest tensor, never the whole model.

Shape suffixes: E experts, D d_model, H the first projection's width (2F for SwiGLU), F expert
hidden size.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from moekit.config import MoEConfig
from moekit.experts import GroupedExperts
from moekit.models.lm import LMConfig, MoETransformerLM

FORMAT = "moekit-expert-store"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
RESIDENT_FILE = "resident.safetensors"
TOKENIZER_FILE = "tokenizer.json"
BLOB_ALIGNMENT = 4096  # file offsets, lengths and read buffers: the O_DIRECT contract on 4 KiB-sector disks
TENSOR_ALIGNMENT = 64  # a tensor's offset inside its blob: a cache line, and grouped_mm's 16 bytes
EXPERTS_DTYPES = ("same", "int8", "int4")
QUANT_GROUP_SIZE = 128  # int4's group along each projection's input (the issue's choice; int8 ignores it)
# NOTE: Linux moves at most 0x7ffff000 bytes per read/write call; larger blobs take several.
_MAX_IO = 0x7FFFF000
_COPY_CHUNK = 64 << 20

# torch dtype <-> safetensors dtype tag (the header's "dtype").
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in _SAFETENSORS_DTYPES}


class StoreError(ValueError):
    """A store that cannot be written or read; the message names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, where: str) -> torch.dtype:
    if name not in _DTYPES_BY_NAME:
        raise StoreError(f"{where}: dtype {name!r} is not one of {sorted(_DTYPES_BY_NAME)}")
    return _DTYPES_BY_NAME[name]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _bytes_of(tensor: Tensor) -> memoryview:
    """A tensor's bytes without a copy (bfloat16 has no numpy dtype: go through uint8)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(data):
        written = os.pwrite(fd, data[done : done + _MAX_IO], offset + done)
        if written <= 0:
            raise StoreError(f"{path}: write failed at byte {offset + done}")
        done += written


# --------------------------------------------------------------------------------------------
# What goes where: the expert tensors and the resident ones of an LMConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLayerSpec:
    """The routed experts of one MoE layer: their module and the per-expert tensor shapes."""

    layer: int  # the block index
    module: str  # "blocks.3.ffn.experts"
    num_experts: int
    shapes: dict[str, tuple[int, ...]]  # parameter name ("w_in") -> one expert's shape ([D, H])


@dataclass(frozen=True)
class ModelLayout:
    expert_layers: list[ExpertLayerSpec]
    resident_shapes: dict[str, tuple[int, ...]]  # canonical state-dict name -> shape
    aliases: dict[str, str]  # tied names (lm_head.weight) -> their canonical name (embed.weight)

    def expert_target(self, name: str) -> tuple[ExpertLayerSpec, str] | None:
        module, _, param = name.rpartition(".")
        for spec in self.expert_layers:
            if spec.module == module and param in spec.shapes:
                return spec, param
        return None


# The tensor factories a module's constructor allocates its weights with.
_WEIGHT_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.tensor}


class _WeightsOnMeta(TorchFunctionMode):
    """Weights created without a device go to the meta device; other tensors stay on the CPU.

    NOTE: not ``with torch.device("meta")``: that also puts the constructor's own random draws
    (an init seed read with ``.item()``) on the meta device, where they cannot be read.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _WEIGHT_FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_lm(config: LMConfig) -> MoETransformerLM:
    """``config``'s LM with every weight on the meta device: names and shapes, no memory.

    The global random state is left as it was (the constructor may draw from it)."""
    with torch.random.fork_rng(devices=[]), _WeightsOnMeta():
        return MoETransformerLM(config)


def model_layout(config: LMConfig) -> ModelLayout:
    """Which tensors of ``config``'s LM are routed experts, and every name's shape."""
    model = meta_lm(config)
    expert_layers = []
    expert_names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            layer = int(module_name.split(".")[1])
            shapes = {name: tuple(param.shape[1:]) for name, param in module.named_parameters()}
            expert_layers.append(ExpertLayerSpec(layer, module_name, module.num_experts, shapes))
            expert_names.update(f"{module_name}.{name}" for name in shapes)
    canonical: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in canonical:
            aliases[name] = canonical[key]
        else:
            canonical[key] = name
    resident = {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()
        if name not in expert_names and name not in aliases
    }
    return ModelLayout(expert_layers, resident, aliases)


# --------------------------------------------------------------------------------------------
# Expert encodings (--experts-dtype)
# --------------------------------------------------------------------------------------------


class SameDtypeCodec:
    """Experts stored as they come: the tensors' own dtype, bytes unchanged.

    A codec maps one expert's tensor to the tensors written for it: ``blob_layout`` fixes a
    blob's bytes before any is written (a prefix, and each stored tensor's offset), ``encode``
    turns a tensor into its stored ones when it arrives, and the reader hands a blob's bytes
    to ``decode`` to build what the layer multiplies with.
    """

    name = "same"

    def blob_layout(self, spec: ExpertLayerSpec, dtype: torch.dtype) -> tuple[bytes, list[TensorEntry], int]:
        """(prefix written at the blob's start, the stored tensors, the blob's length)."""
        entries, offset = [], 0
        for param, shape in spec.shapes.items():
            nbytes = _numel(shape) * dtype.itemsize
            entries.append(TensorEntry(param, tuple(shape), dtype, offset, nbytes))
            offset = _round_up(offset + nbytes, TENSOR_ALIGNMENT)
        return b"", entries, max(entry.offset + entry.nbytes for entry in entries)

    def encode(self, param: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return [(param, tensor)]

    def decode(self, buffer: mmap.mmap, blob: BlobEntry) -> dict[str, Tensor]:
        """The blob's tensors as views into ``buffer`` (its bytes as read; the views keep it alive)."""
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        return {t.name: raw[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in blob.tensors}


class QuantizedCodec:
    """Experts stored quantized (``--experts-dtype int8|int4``, moekit.inference.quant): each
    blob is exactly ``QuantizedExpert.to_bytes()`` of the expert (its self-describing header,
    then ``w_in.qweight``, ``w_in.scales``, ``w_out.qweight``, ``w_out.scales`` and the float32
    biases, int4 already packed for this machine's kernel), so ``decode`` is
    ``QuantizedExpert.from_bytes`` on the read buffer (views, no copy).

    A layer's w_in and w_out arrive at different times, so a blob's layout is fixed first from
    a template: the same header for an all-zero expert of the layer's shapes (the header
    depends on the shapes, the scheme, the activation and the int4 layout only). Each arriving
    projection is quantized one expert at a time (``quantize_linear``), its bytes written at
    the template's offsets: peak memory is one expert's float32 copy, not the layer's.
    """

    def __init__(self, scheme: str, moe: MoEConfig, group_size: int = QUANT_GROUP_SIZE) -> None:
        self.name = scheme
        self.moe = moe
        self.group_size = group_size

    def check_shapes(self, layout: ModelLayout) -> None:
        """int4 needs every projection's input width to be a multiple of the group size: say so
        before any byte is written."""
        if self.name != "int4":
            return
        for spec in layout.expert_layers:
            for param in ("w_in", "w_out"):
                width = spec.shapes[param][0]
                if width % self.group_size:
                    raise StoreError(
                        f"experts_dtype='int4' quantizes in groups of {self.group_size} along each projection's "
                        f"input, but {spec.module}.{param} has input width {width} (d_model for w_in, d_ff for "
                        f"w_out), not a multiple of {self.group_size}; use int8 or same"
                    )

    def _template(self, spec: ExpertLayerSpec) -> bytes:
        from moekit.inference.quant import quantize_expert

        (d_model, width_in), (d_ff, _) = spec.shapes["w_in"], spec.shapes["w_out"]
        biases = "b_in" in spec.shapes
        expert = quantize_expert(
            torch.zeros(d_model, width_in), torch.zeros(d_ff, d_model), self.name, self.moe.activation,
            self.group_size, torch.zeros(width_in) if biases else None, torch.zeros(d_model) if biases else None,
            self.moe.swiglu_alpha, self.moe.swiglu_limit,
        )
        return expert.to_bytes()

    def blob_layout(self, spec: ExpertLayerSpec, dtype: torch.dtype) -> tuple[bytes, list[TensorEntry], int]:
        if set(spec.shapes) - {"w_in", "w_out", "b_in", "b_out"}:
            raise StoreError(f"{spec.module}: experts with tensors {sorted(spec.shapes)} cannot be quantized")
        template = self._template(spec)
        header_length = int.from_bytes(template[8:12], "little")
        header = json.loads(template[12 : 12 + header_length])
        payload_start = _round_up(12 + header_length, TENSOR_ALIGNMENT)
        self.layouts = {name: p["layout"] for name, p in header["projections"].items()}
        entries = []
        for name, entry in header["tensors"].items():
            stored_dtype = parse_dtype(entry["dtype"], "quantized expert template")
            shape = tuple(entry["shape"])
            entries.append(TensorEntry(name, shape, stored_dtype, payload_start + entry["offset"],
                                       _numel(shape) * stored_dtype.itemsize))
        return template[:payload_start], entries, len(template)

    def encode(self, param: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        from moekit.inference.quant import quantize_linear

        if param.startswith("b_"):
            return [(param, tensor.detach().float())]
        # A moekit expert computes x @ w_in[e] ([D, H]): the linear layer's weight is its transpose.
        linear = quantize_linear(tensor.t(), self.name, self.group_size)
        if linear.layout != self.layouts.get(param, linear.layout):
            raise StoreError(f"{param}: quantized in int4 layout {linear.layout!r}, the blob's header says "
                             f"{self.layouts[param]!r}")
        return [(f"{param}.qweight", linear.qweight), (f"{param}.scales", linear.scales)]

    def decode(self, buffer: mmap.mmap, blob: BlobEntry) -> Any:
        """The blob's ``QuantizedExpert`` (its tensors views into ``buffer``, which they keep alive)."""
        from moekit.inference.quant import QuantizedExpert

        view = memoryview(buffer)[: blob.length]
        try:
            expert = QuantizedExpert.from_bytes(view)
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(f"blob of layer {blob.layer} expert {blob.expert} in {blob.file}: {error}") from error
        if expert.scheme != self.name:
            raise StoreError(f"blob of layer {blob.layer} expert {blob.expert} in {blob.file} holds a "
                             f"{expert.scheme} expert but the index says {self.name}")
        # NOTE: an int4 blob packed on a CPU with another packed layout comes back repacked into
        # fresh memory; the repacked bytes have the same size, so they go back into the buffer,
        # which then holds everything the expert uses (the budget counts the buffer).
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        offsets = {t.name: t.offset for t in blob.tensors}
        for name in ("w_in", "w_out"):
            linear = getattr(expert, name)
            start = offsets[f"{name}.qweight"]
            if linear.qweight.data_ptr() != raw.data_ptr() + start:
                packed = linear.qweight.contiguous().view(torch.uint8).reshape(-1)
                in_buffer = raw[start : start + packed.numel()]
                in_buffer.copy_(packed)
                linear.qweight = in_buffer.view(linear.qweight.dtype).view(linear.qweight.shape)
        return expert


Codec = SameDtypeCodec | QuantizedCodec


def expert_codec(experts_dtype: str, moe: MoEConfig | None = None) -> Codec:
    """The codec of ``experts_dtype`` ("same", "int8", "int4"); the quantized ones need the
    layers' MoEConfig (the activation is part of a quantized blob)."""
    if experts_dtype == "same":
        return SameDtypeCodec()
    if experts_dtype in ("int8", "int4"):
        if moe is None:
            raise StoreError(f"experts_dtype={experts_dtype!r} needs the model's MoEConfig")
        return QuantizedCodec(experts_dtype, moe)
    raise StoreError(f"experts_dtype={experts_dtype!r} is invalid: use one of {', '.join(EXPERTS_DTYPES)}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str  # the expert tensor's parameter name (w_in, w_out, b_in, b_out)
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # inside the blob
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "offset": self.offset, "nbytes": self.nbytes}


@dataclass(frozen=True)
class BlobEntry:
    layer: int
    expert: int
    file: str
    offset: int  # 4 KiB aligned
    length: int  # the bytes of its tensors (and the padding between them)
    padded_length: int  # length rounded up to 4 KiB: what one read fetches
    crc32: int
    tensors: tuple[TensorEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "expert": self.expert, "file": self.file, "offset": self.offset,
                "length": self.length, "padded_length": self.padded_length, "crc32": self.crc32,
                "tensors": [tensor.to_dict() for tensor in self.tensors]}


class _ExpertFileWriter:
    """One MoE layer's expert file; its layout is fixed when its first tensor arrives."""

    def __init__(self, directory: Path, spec: ExpertLayerSpec, codec: Codec, dtype: torch.dtype) -> None:
        self.spec = spec
        self.codec = codec
        self.dtype = dtype
        self.file = f"experts-{spec.layer:03d}.bin"
        self.path = directory / self.file
        prefix, entries, self.length = codec.blob_layout(spec, dtype)
        self.tensors = {entry.name: entry for entry in entries}
        self.stride = _round_up(self.length, BLOB_ALIGNMENT)
        self.received: set[str] = set()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.stride * spec.num_experts)
        if prefix:
            for expert in range(spec.num_experts):
                _pwrite_all(self.fd, memoryview(prefix), expert * self.stride, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, param: str, name: str, tensor_EX: Tensor) -> None:
        if tensor_EX.dtype != self.dtype:
            raise StoreError(
                f"tensor {name} has dtype {dtype_name(tensor_EX.dtype)} but the layer's other expert tensors "
                f"{dtype_name(self.dtype)}: a layer's expert tensors must share one dtype"
            )
        for expert in range(self.spec.num_experts):
            for stored, value in self.codec.encode(param, tensor_EX[expert]):
                entry = self.tensors[stored]
                data = _bytes_of(value)
                if len(data) != entry.nbytes:
                    raise StoreError(f"tensor {name}: encoded {stored} has {len(data)} bytes, expected {entry.nbytes}")
                _pwrite_all(self.fd, data, expert * self.stride + entry.offset, self.path)
        self.received.add(param)

    def finish(self) -> list[BlobEntry]:
        """Checksum every blob (read back: the bytes as they are on disk) and close the file."""
        os.fsync(self.fd)
        self.close()
        blobs = []
        with open(self.path, "rb") as handle:
            for expert in range(self.spec.num_experts):
                handle.seek(expert * self.stride)
                crc = zlib.crc32(handle.read(self.length))
                blobs.append(BlobEntry(self.spec.layer, expert, self.file, expert * self.stride, self.length,
                                       self.stride, crc, tuple(self.tensors.values())))
            _posix_fadvise_dontneed(handle.fileno(), 0, 0)  # written and synced: no need to keep it cached
        return blobs


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class _SafetensorsStreamWriter:
    """A safetensors file written one tensor at a time.

    The header (names, dtypes, shapes, offsets) precedes the data, but a tensor's dtype is only
    known when it arrives; so the data is written after a header slot sized for the widest
    possible header, and the real header is written last, padded with spaces to the slot (the
    format allows trailing spaces in the header).
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = path
        widest = {name: {"dtype": "XXXXXXXX", "shape": list(shape), "data_offsets": [10**16, 10**16]}
                  for name, shape in shapes.items()}
        widest["__metadata__"] = {"format": "pt"}  # type: ignore[assignment]
        self.header_size = _round_up(len(json.dumps(widest, separators=(",", ":"))) + 8, 8)
        self.entries: dict[str, dict[str, Any]] = {}
        self.data_end = 0
        self.crcs: dict[str, int] = {}  # to check a tied name's second copy against the first
        self.handle = open(path, "wb")
        self.handle.seek(8 + self.header_size)

    def write(self, name: str, tensor: Tensor) -> None:
        data = _bytes_of(tensor)
        self.handle.write(data)
        self.crcs[name] = zlib.crc32(data)
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.data_end, self.data_end + len(data)]}
        self.data_end += len(data)

    def tensor_specs(self) -> dict[str, dict[str, Any]]:
        """name -> {"shape", "dtype"} (torch dtype names) of every tensor written."""
        names = {tag: dtype_name(dtype) for dtype, tag in _SAFETENSORS_DTYPES.items()}
        return {name: {"shape": entry["shape"], "dtype": names[entry["dtype"]]} for name, entry in self.entries.items()}

    def finish(self) -> int:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (self.header_size - len(header))
        self.handle.seek(0)
        self.handle.write(len(header).to_bytes(8, "little"))
        self.handle.write(header)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        return self.data_end


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class SafetensorsReader:
    """A safetensors file read one tensor at a time with ``pread`` into fresh memory.

    No mapping of the file: with ``safe_open`` every page read through its mmap stays in the
    process's RSS until the file is closed, so reading a whole checkpoint that way holds all of
    it. Here a tensor's memory is freed when the tensor is.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        tags = {tag: dtype for dtype, tag in _SAFETENSORS_DTYPES.items()}
        try:
            with open(self.path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                self.file_size = os.fstat(handle.fileno()).st_size
                if header_size <= 0 or 8 + header_size > self.file_size:
                    raise StoreError(
                        f"{self.path}: not a safetensors file, or truncated (header of {header_size} bytes)"
                    )
                header = json.loads(handle.read(header_size))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(f"{self.path}: unreadable safetensors header ({error})") from error
        self.data_start = 8 + header_size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        try:
            self._read_entries(header, tags)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, StoreError):
                raise
            raise StoreError(f"{self.path}: malformed safetensors header ({error})") from error

    def _read_entries(self, header: dict[str, Any], tags: dict[str, torch.dtype]) -> None:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in tags:
                raise StoreError(f"{self.path}: tensor {name} has dtype {entry.get('dtype')!r}, which moekit "
                                 f"cannot read (one of {sorted(tags)})")
            start, end = (int(v) for v in entry["data_offsets"])
            if self.data_start + end > self.file_size:
                raise StoreError(f"{self.path}: tensor {name} ends at byte {self.data_start + end} but the file has "
                                 f"{self.file_size}; the file is truncated")
            self.entries[name] = (tags[entry["dtype"]], tuple(int(s) for s in entry["shape"]), start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> Tensor:
        dtype, shape, start, end = self.entries[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                count = os.preadv(fd, [view[done : done + _MAX_IO]], self.data_start + start + done)
                if count == 0:
                    raise StoreError(f"{self.path}: ends inside tensor {name}; the file is truncated")
                done += count
        finally:
            view.release()
            os.close(fd)
        return raw.view(dtype).view(shape) if raw.numel() else torch.empty(shape, dtype=dtype)


def check_new_store_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out}: exists and is not an empty directory; choose a new one (nothing was written)")


def write_store(
    out: str | Path,
    config: LMConfig,
    tensors: Iterable[tuple[str, Tensor]],
    experts_dtype: str = "same",
    tokenizer: dict | None = None,
    source: str | None = None,
) -> Path:
    """Write the store of ``config``'s LM from ``(moekit state-dict name, tensor)`` pairs.

    Every tensor of the model must come exactly once, in any order (a tied name may stand for
    its canonical one: ``lm_head.weight`` for ``embed.weight``); each is written as it
    arrives and dropped. The store is written into ``out.tmp-PID`` and renamed into place, so
    ``out`` holds a complete store or nothing. Returns ``out``.
    """
    codec = expert_codec(experts_dtype, config.moe)
    out = Path(out)
    check_new_store_dir(out)
    layout = model_layout(config)
    if isinstance(codec, QuantizedCodec):
        codec.check_shapes(layout)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_into(tmp, layout, config, tensors, codec, tokenizer, source)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_into(
    directory: Path, layout: ModelLayout, config: LMConfig, tensors: Iterable[tuple[str, Tensor]],
    codec: Codec, tokenizer: dict | None, source: str | None,
) -> None:
    resident = _SafetensorsStreamWriter(directory / RESIDENT_FILE, layout.resident_shapes)
    expert_files: dict[int, _ExpertFileWriter] = {}
    try:
        _write_tensors(layout, tensors, resident, expert_files, directory, codec)
    except BaseException:
        resident.handle.close()
        for writer in expert_files.values():
            writer.close()
        raise
    non_expert_bytes = resident.finish()
    _finish_index(directory, config, codec, tokenizer, source, resident, non_expert_bytes, expert_files)


def _write_tensors(
    layout: ModelLayout, tensors: Iterable[tuple[str, Tensor]], resident: _SafetensorsStreamWriter,
    expert_files: dict[int, _ExpertFileWriter], directory: Path, codec: Codec,
) -> None:
    """Write each tensor where it belongs; every one of the model's tensors must come once."""
    seen: set[str] = set()
    for name, tensor in tensors:
        canonical = layout.aliases.get(name, name)
        tensor = tensor.detach().cpu()
        if canonical in seen:
            # A state dict names tied weights twice (embed.weight, lm_head.weight): the same bytes are fine.
            tied_copy = canonical != name or name in layout.aliases.values()
            same_bytes = canonical in resident.crcs and resident.crcs[canonical] == zlib.crc32(_bytes_of(tensor))
            if not (tied_copy and same_bytes):
                raise StoreError(f"tensor {name} given twice" + (f" (as {canonical})" if canonical != name else "")
                                 + (" with other values: the config ties them" if tied_copy else ""))
            continue
        seen.add(canonical)
        target = layout.expert_target(canonical)
        if target is not None:
            spec, param = target
            expected = (spec.num_experts, *spec.shapes[param])
            if tuple(tensor.shape) != expected:
                raise StoreError(f"tensor {name} has shape {list(tensor.shape)}, the config implies {list(expected)}")
            if spec.layer not in expert_files:
                expert_files[spec.layer] = _ExpertFileWriter(directory, spec, codec, tensor.dtype)
            expert_files[spec.layer].write(param, name, tensor)
        elif canonical in layout.resident_shapes:
            expected = layout.resident_shapes[canonical]
            if tuple(tensor.shape) != expected:
                raise StoreError(f"tensor {name} has shape {list(tensor.shape)}, the config implies {list(expected)}")
            if tensor.dtype not in _SAFETENSORS_DTYPES:
                raise StoreError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot hold")
            resident.write(canonical, tensor)
        else:
            raise StoreError(f"tensor {name} is not a weight of the model config (LMConfig) being packed")
        del tensor
    expected_names = set(layout.resident_shapes) | {
        f"{spec.module}.{param}" for spec in layout.expert_layers for param in spec.shapes
    }
    missing = sorted(expected_names - seen)
    if missing:
        raise StoreError(f"{len(missing)} weights missing from the source, e.g. {missing[:5]}")


def _finish_index(
    directory: Path, config: LMConfig, codec: Codec, tokenizer: dict | None, source: str | None,
    resident: _SafetensorsStreamWriter, non_expert_bytes: int, expert_files: dict[int, _ExpertFileWriter],
) -> None:
    blobs = [blob for layer in sorted(expert_files) for blob in expert_files[layer].finish()]
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "experts_dtype": codec.name,
        "blob_alignment": BLOB_ALIGNMENT,
        "source": source,
        "resident": {"file": RESIDENT_FILE, "bytes": (directory / RESIDENT_FILE).stat().st_size,
                     "tensor_bytes": non_expert_bytes, "crc32": file_crc32(directory / RESIDENT_FILE),
                     "tensors": resident.tensor_specs()},
        "expert_files": [{"layer": layer, "file": writer.file, "bytes": writer.stride * writer.spec.num_experts}
                         for layer, writer in sorted(expert_files.items())],
        "blobs": [blob.to_dict() for blob in blobs],
    }
    if tokenizer is not None:
        (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer))
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a directory with an expert store's index.json."""
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _posix_fadvise_dontneed(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class _ExpertFile:
    """An open expert file: ``O_DIRECT`` where the filesystem allows it, buffered otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.direct = False
        self.fd = -1
        direct_flag = getattr(os, "O_DIRECT", 0)
        if direct_flag:
            try:
                self.fd = os.open(path, os.O_RDONLY | direct_flag)
                self.direct = True
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise StoreError(f"{path}: cannot open ({error.strerror})") from error
        if self.fd < 0:
            try:
                self._open_buffered()
            except OSError as error:
                raise StoreError(f"{path}: cannot open ({error.strerror})") from error

    def _open_buffered(self) -> None:
        self.fd = os.open(self.path, os.O_RDONLY)
        self.direct = False
        if hasattr(os, "posix_fadvise"):
            # NOTE: no read-ahead: pages read ahead of a blob would stay cached after the blob's
            # own range is dropped, and count against the budget.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, offset: int, length: int, into: Any = None) -> Any:
        """``length`` bytes (a multiple of 4 KiB) at ``offset`` into ``into`` (a writable,
        page-aligned buffer of at least ``length`` bytes, returned as a memoryview of its first
        ``length``), or into a fresh page-aligned buffer."""
        if into is None:
            buffer = mmap.mmap(-1, length)
        else:
            buffer = memoryview(into).cast("B")[:length]
            if len(buffer) < length:
                raise ValueError(f"read of {length} bytes into a buffer of {len(buffer)}")
        view = memoryview(buffer)
        try:
            done = 0
            while done < length:
                try:
                    count = os.preadv(self.fd, [view[done : done + _MAX_IO]], offset + done)
                except OSError as error:
                    if error.errno == errno.EINVAL and self.direct:
                        # The filesystem opened with O_DIRECT but refuses aligned direct reads: buffered from now on.
                        self._reopen_buffered()
                        continue
                    raise StoreError(f"{self.path}: read of bytes {offset}..{offset + length} failed "
                                     f"({error.strerror})") from error
                if count == 0:
                    raise StoreError(f"{self.path}: ends before byte {offset + length}; the store is truncated")
                done += count
        finally:
            view.release()
        if not self.direct:
            # NOTE: the bytes now live in our buffer; their page-cache copy would count twice against the budget.
            _posix_fadvise_dontneed(self.fd, offset, length)
        return buffer

    def _reopen_buffered(self) -> None:
        os.close(self.fd)
        self._open_buffered()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ExpertStore:
    """A store opened for reading: its config, the resident weights, one expert blob at a time.

    Opening checks the index and that every file is present with the size the index gives
    (a truncated file is a ``StoreError`` naming it); ``verify=True`` checks the resident
    file's CRC-32 at open and each blob's CRC-32 when it is read (a corrupt blob is a
    ``StoreError`` naming the file, layer and expert).
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise StoreError(f"{index_path}: missing; {self.path} is not an expert store (make one with moekit pack)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(f"{index_path}: unreadable index ({error})") from error
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise StoreError(f"{index_path}: not a moekit expert store index (format is not {FORMAT!r})")
        if index.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{index_path}: format_version {index.get('format_version')!r}; this moekit reads "
                             f"version {FORMAT_VERSION} (re-pack the model with this moekit)")
        try:
            self.config = LMConfig.from_dict(index["model"])
            self.experts_dtype = index["experts_dtype"]
            self.resident_bytes_on_disk = int(index["resident"]["bytes"])
            self.non_expert_bytes = int(index["resident"]["tensor_bytes"])
            self.resident_crc32 = int(index["resident"]["crc32"])
            self.resident_specs = {
                str(name): (tuple(int(s) for s in spec["shape"]), parse_dtype(spec["dtype"], str(index_path)))
                for name, spec in index["resident"]["tensors"].items()
            }
            self.blobs = {(int(b["layer"]), int(b["expert"])): _blob_from_dict(b, index_path) for b in index["blobs"]}
            file_sizes = {str(f["file"]): int(f["bytes"]) for f in index["expert_files"]}
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{index_path}: malformed index ({type(error).__name__}: {error})") from error
        try:
            self.codec = expert_codec(self.experts_dtype, self.config.moe)
        except StoreError as error:
            raise StoreError(f"{index_path}: {error}") from error
        self.source = index.get("source")
        self.layers = sorted({layer for layer, _ in self.blobs})
        layout = model_layout(self.config)
        expected = {(spec.layer, e) for spec in layout.expert_layers for e in range(spec.num_experts)}
        if set(self.blobs) != expected:
            raise StoreError(f"{index_path}: the blobs do not match the model config's MoE layers and experts")
        self._check_size(self.path / RESIDENT_FILE, self.resident_bytes_on_disk)
        for file, size in file_sizes.items():
            self._check_size(self.path / file, size)
        if verify and file_crc32(self.path / RESIDENT_FILE) != self.resident_crc32:
            raise StoreError(f"{self.path / RESIDENT_FILE}: CRC-32 mismatch; the file is corrupt (re-pack the model)")
        self._files: dict[str, _ExpertFile] = {}
        self._verified: set[tuple[int, int]] = set()  # blobs whose CRC-32 matched once

    @staticmethod
    def _check_size(path: Path, expected: int) -> None:
        if not path.is_file():
            raise StoreError(f"{path}: missing from the store")
        size = path.stat().st_size
        if size != expected:
            state = "truncated" if size < expected else "longer than the index says"
            raise StoreError(f"{path}: {size} bytes but the index expects {expected}; the file is {state}")

    @property
    def expert_files(self) -> list[Path]:
        return [self.path / name for name in sorted({blob.file for blob in self.blobs.values()})]

    @property
    def files(self) -> list[Path]:
        """Every file whose pages count as this store's memory when cached."""
        return [self.path / RESIDENT_FILE, *self.expert_files]

    @property
    def expert_bytes(self) -> int:
        """All blobs, padded: the memory the experts take when every one is cached."""
        return sum(blob.padded_length for blob in self.blobs.values())

    def blob(self, layer: int, expert: int) -> BlobEntry:
        return self.blobs[layer, expert]

    def read_blob(self, layer: int, expert: int, into: Any = None) -> Any:
        """The blob of (layer, expert): one read of its padded length into ``into`` (a writable,
        page-aligned buffer at least that long, reused by the expert cache; the result is a
        memoryview of its first padded-length bytes) or into a fresh page-aligned buffer.

        ``verify``: the blob's CRC-32 is checked the first time this store reads it. A blob read
        again is the same bytes of the same file, already checked, and a CRC over every read
        would cost the decode of an offloaded model about a third of its read time (zlib's
        CRC-32 runs at ~3.4 GB/s on one core, the disk here at ~1 GB/s)."""
        blob = self.blobs[layer, expert]
        file = self._files.get(blob.file)
        if file is None:
            file = self._files[blob.file] = _ExpertFile(self.path / blob.file)
        buffer = file.read(blob.offset, blob.padded_length, into)
        if self.verify and (layer, expert) not in self._verified:
            if zlib.crc32(memoryview(buffer)[: blob.length]) != blob.crc32:
                raise StoreError(f"{self.path / blob.file}: CRC-32 mismatch in the blob of layer {layer} expert "
                                 f"{expert} (bytes {blob.offset}..{blob.offset + blob.length}); the file is corrupt")
            self._verified.add((layer, expert))
        return buffer

    def expert_tensors(self, layer: int, expert: int, into: Any = None) -> tuple[dict[str, Tensor], int]:
        """The stored tensors of (layer, expert) as views into one read buffer (``into``, or a
        fresh one: ``read_blob``), and the blob's padded size in bytes."""
        blob = self.blobs[layer, expert]
        buffer = self.read_blob(layer, expert, into)
        raw = torch.frombuffer(buffer, dtype=torch.uint8)  # keeps the buffer alive
        tensors = {
            t.name: raw[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in blob.tensors
        }
        return tensors, blob.padded_length

    def expert(self, layer: int, expert: int, into: Any = None) -> tuple[Any, int]:
        """(layer, expert) as its codec decodes it (``dict`` of tensors for "same", a
        ``QuantizedExpert`` for int8/int4), views into one read buffer (``into``, or a fresh
        one: ``read_blob``), and the blob's padded size in bytes (what it holds in memory)."""
        blob = self.blobs[layer, expert]
        return self.codec.decode(self.read_blob(layer, expert, into), blob), blob.padded_length

    def resident_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Each resident tensor, read one at a time into its own memory."""
        path = self.path / RESIDENT_FILE
        reader = SafetensorsReader(path)
        for name in reader.keys():
            yield name, reader.get(name)
        # NOTE: the weights now live in the process; their page-cache copy would count twice.
        self.drop_from_page_cache([path])

    def drop_from_page_cache(self, paths: Iterable[Path] | None = None) -> None:
        """Ask the kernel to drop the store's files from the page cache (a cold start)."""
        for path in self.files if paths is None else paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                _posix_fadvise_dontneed(fd, 0, 0)
            finally:
                os.close(fd)

    def verify_all(self) -> None:
        """Read every blob and check its CRC-32 (the resident file is checked at open)."""
        verify, self.verify = self.verify, True
        self._verified.clear()
        try:
            for layer, expert in sorted(self.blobs):
                self.read_blob(layer, expert).close()
        finally:
            self.verify = verify

    def tokenizer(self) -> dict | None:
        path = self.path / TOKENIZER_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise StoreError(f"{path}: unreadable tokenizer ({error})") from error

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blob_from_dict(entry: dict[str, Any], where: Path) -> BlobEntry:
    tensors = tuple(
        TensorEntry(str(t["name"]), tuple(int(s) for s in t["shape"]), parse_dtype(t["dtype"], str(where)),
                    int(t["offset"]), int(t["nbytes"]))
        for t in entry["tensors"]
    )
    blob = BlobEntry(int(entry["layer"]), int(entry["expert"]), str(entry["file"]), int(entry["offset"]),
                     int(entry["length"]), int(entry["padded_length"]), int(entry["crc32"]), tensors)
    if blob.offset % BLOB_ALIGNMENT or blob.padded_length % BLOB_ALIGNMENT or blob.length > blob.padded_length:
        raise StoreError(
            f"{where}: blob of layer {blob.layer} expert {blob.expert} is not {BLOB_ALIGNMENT}-byte aligned"
        )
    if "/" in blob.file or blob.file.startswith("."):
        raise StoreError(f"{where}: blob file name {blob.file!r} must be a plain file name inside the store")
    for tensor in tensors:
        if tensor.offset + tensor.nbytes > blob.length or tensor.nbytes != _numel(tensor.shape) * tensor.dtype.itemsize:
            raise StoreError(f"{where}: tensor {tensor.name} of layer {blob.layer} expert {blob.expert} "
                             "does not fit its blob")
    return blob
