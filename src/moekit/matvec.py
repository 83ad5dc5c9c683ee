"""Batch-1 matrix-vector products that read weights at the memory bandwidth: decoding's kernel.

Decoding one token multiplies one activation row by every weight matrix it uses. Each weight is
read once and used for two flops, so the time is the weight bytes over the memory bandwidth.
PyTorch's CPU GEMM (MKL / oneDNN) reads a [1, K] × [K, M] product at well under the machine's
streaming rate (docs/bench_generate.md measures both); ``matvec.c`` reads each weight matrix as
one sequential stream per thread and reaches it.

The C source ships with the package and is compiled on first use with the machine's C compiler
(``cc``, or ``$CC``) for the machine's own vector width, into ``~/.cache/moekit`` (or
``$MOEKIT_CACHE_DIR``). Without a compiler, or with ``MOEKIT_MATVEC=0``, every caller falls back
to ``torch`` and ``status()`` says why; nothing else changes.

Two layouts, both row-major and contiguous:

- ``rows(x, weight_OI)`` = ``x @ weight_OI.T``: nn.Linear's layout [out, in];
- ``cols(x, weight_IO)`` = ``x @ weight_IO``: moekit's expert layout [in, out];
  ``cols_experts`` runs a token's k experts of an [E, in, out] weight in one call,
  ``cols_matrices`` k separately stored [in, out] matrices (an offloaded layer's experts);
- ``rows_int8(x, q_OI, scales_O)``: int8 weights with one scale per output row;
- ``experts_ffn`` / ``experts_ffn_int8``: a decoded token's k experts (both projections, the
  nonlinearity) and their weighted sum in one call;
- ``attention_block``: a pre-norm block's whole attention half for one decoded token (norm,
  qkv, rotary, KV-cache write, grouped-query attention, output projection, residual, the FFN's
  norm) in one call: a decode step's per-layer Python and small-op time is most of what is not
  weight streaming (docs/bench_generate.md).

Weights float32 or bfloat16, arithmetic in float32. A bfloat16 ``x`` is widened to float32 and
the result rounded back to bfloat16 once, as PyTorch's bfloat16 GEMM accumulates in float32.
Each output is summed by one thread in an order fixed by the shapes, so results do not depend on
the thread count; they differ from PyTorch's GEMM by float rounding only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("matvec.c")
# Tried in order: the machine's own vector width and OpenMP threads, then without each.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# Below this many weight elements torch's GEMM, in cache and with less per-call overhead, is
# faster (measured: 10 µs per call here against 3.5 µs for a 128 × 128 F.linear, and 15 against
# 27 µs at 256 × 256, on a 2-core AMD EPYC).
MIN_WEIGHT_ELEMENTS = 32768

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_functions: dict[tuple[str, torch.dtype], Any] = {}
_status: str | None = None
_enabled = True


def _cache_dir() -> Path:
    """``$MOEKIT_CACHE_DIR``, else ``~/.cache/moekit``; a temporary directory where that
    cannot be created (a read-only home)."""
    configured = os.environ.get("MOEKIT_CACHE_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "moekit"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"moekit-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a shared home directory may
    be mounted on several machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _compile(compiler: str, flags: tuple[str, ...], out: Path) -> str | None:
    """Compile the source to ``out`` (atomically); the compiler's error text on failure."""
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        built = Path(scratch) / out.name
        command = [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return str(error)
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        os.replace(built, out)  # another process may build the same file: both are complete
    return None


def _load() -> ctypes.CDLL | None:
    global _library, _status
    with _lock:
        if _status is not None:
            return _library
        if os.environ.get("MOEKIT_MATVEC", "1") == "0":
            _status = "off: MOEKIT_MATVEC=0"
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            _status = "off: no C compiler (cc, gcc or $CC) found"
            warnings.warn(f"moekit.matvec {_status}; decoding uses torch's matmul", stacklevel=3)
            return None
        source = SOURCE.read_bytes()
        errors = []
        for flags in FLAG_SETS:
            key = hashlib.sha256(
                b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
            ).hexdigest()[:16]
            path = _cache_dir() / f"matvec-{key}.so"
            error = None if path.exists() else _compile(compiler, flags, path)
            if error is None:
                try:
                    library = ctypes.CDLL(str(path))
                except OSError as load_error:
                    errors.append(f"{' '.join(flags)}: {load_error}")
                    continue
                for name in ("moekit_rows_f32", "moekit_rows_bf16", "moekit_cols_f32", "moekit_cols_bf16"):
                    function = getattr(library, name)
                    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
                    function.restype = ctypes.c_int
                for name in ("moekit_cols_batch_f32", "moekit_cols_batch_bf16", "moekit_rows_batch_f32",
                             "moekit_rows_batch_bf16"):
                    function = getattr(library, name)
                    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                    function.restype = ctypes.c_int
                library.moekit_rows_i8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
                library.moekit_rows_i8.restype = ctypes.c_int
                library.moekit_attn_block.argtypes = (
                    [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
                    + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
                )
                library.moekit_attn_block.restype = ctypes.c_int
                library.moekit_experts_decode.argtypes = (
                    [ctypes.c_void_p] * 6 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_float,
                                             ctypes.c_int, ctypes.c_int, ctypes.c_int]
                )
                library.moekit_experts_decode.restype = ctypes.c_int
                library.moekit_route_experts_decode.argtypes = (
                    [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int, ctypes.c_float]
                    + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3
                    + [ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
                )
                library.moekit_route_experts_decode.restype = ctypes.c_int
                library.moekit_lm_decode.argtypes = (
                    [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 5
                    + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3 + [ctypes.c_int64] * 2
                    + [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
                    + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_float, ctypes.c_float]
                    + [ctypes.c_int] * 3
                )
                library.moekit_lm_decode.restype = ctypes.c_int
                library.moekit_experts_decode_i8.argtypes = (
                    [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_float, ctypes.c_float,
                                                                     ctypes.c_int, ctypes.c_int]
                )
                library.moekit_experts_decode_i8.restype = ctypes.c_int
                _library = library
                _status = f"native ({Path(compiler).name} {' '.join(flags)})"
                return library
            errors.append(f"{' '.join(flags)}: {error}")
        _status = "off: the C kernels did not build: " + "; ".join(errors)
        warnings.warn(f"moekit.matvec {_status}; decoding uses torch's matmul", stacklevel=3)
        return None


def status() -> str:
    """``native (compiler and flags)`` or ``off: why``; builds the kernels if not yet tried."""
    _load()
    assert _status is not None
    return _status if _enabled else "off: disabled by moekit.matvec.set_enabled(False)"


def available() -> bool:
    return _enabled and _load() is not None


def set_enabled(enabled: bool) -> bool:
    """Turn the kernels on or off for this process (for comparisons); returns the old setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _eligible(
    x: Tensor, weight: Tensor, matrix_elements: int, x_dtypes: tuple[torch.dtype, ...], contiguous: bool = True
) -> bool:
    """The conditions every kernel shares: enabled and built, CPU tensors, a contiguous weight
    (unless the caller checks its layout itself) whose matrices hold at least
    ``MIN_WEIGHT_ELEMENTS``, x of an accepted dtype, and no autograd graph to build (inference)."""
    if not _enabled or weight.device.type != "cpu" or x.device.type != "cpu":
        return False
    if contiguous and not weight.is_contiguous():
        return False
    if matrix_elements < MIN_WEIGHT_ELEMENTS or x.dtype not in x_dtypes:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return _library is not None or _load() is not None


def _one_row(x: Tensor) -> bool:
    return x.numel() != 0 and x.numel() == x.shape[-1]


def _kernel(name: str) -> Any:
    """The C function ``name``; an error saying why when the kernels are off."""
    library = _load()
    if library is None:
        raise RuntimeError(f"moekit.matvec: {name} cannot run: the kernels are {status()}")
    return getattr(library, name)


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x`` (one row) times ``weight`` runs here: CPU, inference (no autograd graph to
    build), a contiguous float32 or bfloat16 2-D weight of at least ``MIN_WEIGHT_ELEMENTS``,
    and x of the weight's dtype (as F.linear requires)."""
    return (
        _one_row(x) and weight.dim() == 2 and weight.dtype in WEIGHT_DTYPES
        and _eligible(x, weight, weight.numel(), (weight.dtype,))
    )


def _run(name: str, x: Tensor, weight: Tensor, rows: int, inner: int, out_features: int) -> Tensor:
    function = _functions.get((name, weight.dtype))
    if function is None:
        suffix = "f32" if weight.dtype == torch.float32 else "bf16"
        function = _functions[(name, weight.dtype)] = _kernel(f"{name}_{suffix}")
    x_I = x.reshape(-1)
    if x_I.dtype != torch.float32:
        x_I = x_I.float()
    elif not x_I.is_contiguous():
        x_I = x_I.contiguous()
    y_O = torch.empty(out_features, dtype=torch.float32)
    if function(weight.data_ptr(), x_I.data_ptr(), y_O.data_ptr(), rows, inner, torch.get_num_threads()) != 0:
        raise MemoryError(f"moekit.matvec.{name.removeprefix('moekit_')}: could not allocate its scratch buffer")
    y = y_O if x.dtype == torch.float32 else y_O.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def rows(x: Tensor, weight_OI: Tensor) -> Tensor:
    """``x @ weight_OI.T`` for one row x [..., I] (nn.Linear's layout); check ``applies`` first."""
    out_features, in_features = weight_OI.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"matvec.rows: x has {x.shape[-1]} features, the weight [O, I] = {tuple(weight_OI.shape)}")
    return _run("moekit_rows", x, weight_OI, out_features, in_features, out_features)


def cols(x: Tensor, weight_IO: Tensor) -> Tensor:
    """``x @ weight_IO`` for one row x [..., I] (moekit's expert layout); check ``applies`` first."""
    in_features, out_features = weight_IO.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"matvec.cols: x has {x.shape[-1]} features, the weight [I, O] = {tuple(weight_IO.shape)}")
    return _run("moekit_cols", x, weight_IO, in_features, out_features, out_features)


def applies_int8(x: Tensor, qweight_OI: Tensor) -> bool:
    """Whether ``rows_int8`` runs ``x`` (one row, float32 / bfloat16 / float16) times an int8
    [out, in] weight: the same conditions as ``applies``."""
    return (
        _one_row(x) and qweight_OI.dim() == 2 and qweight_OI.dtype == torch.int8
        and x.shape[-1] == qweight_OI.shape[1]
        and _eligible(x, qweight_OI, qweight_OI.numel(), (torch.float32, torch.bfloat16, torch.float16))
    )


def rows_int8(x: Tensor, qweight_OI: Tensor, scales_O: Tensor) -> Tensor:
    """``(x @ qweight_OI.T) · scales_O`` for one row x [..., I] and int8 weights with one scale
    per output (``torch._weight_int8pack_mm``'s contract); float32 sums, x's dtype out. Check
    ``applies_int8`` first."""
    out_features, in_features = qweight_OI.shape
    x_I = x.reshape(-1).float().contiguous()
    scales_O = scales_O.float().contiguous()
    y_O = torch.empty(out_features, dtype=torch.float32)
    code = _kernel("moekit_rows_i8")(
        qweight_OI.data_ptr(), scales_O.data_ptr(), x_I.data_ptr(), y_O.data_ptr(), out_features, in_features,
        torch.get_num_threads(),
    )
    if code != 0:
        raise MemoryError("moekit.matvec.rows_int8: could not allocate its scratch buffer")
    return y_O.to(x.dtype).view(*x.shape[:-1], out_features)


def expert_layout(weight: Tensor) -> str | None:
    """How an [E, I, O] stack of expert weights (or one [I, O] expert) lies in memory:
    ``"cols"`` when each expert's matrix is row-major [I, O] (moekit's layout, ``x @ W``),
    ``"rows"`` when it is stored [O, I] and viewed transposed (the nn.Linear layout that
    transformers' experts use, kept as it is by ``moekit.interop``), None otherwise. The decode
    kernels read either: ``cols`` / ``rows`` sums respectively. Consecutive experts may lie
    apart (a stride over the experts larger than one matrix)."""
    *lead, in_features, out_features = weight.shape
    matrix = in_features * out_features
    # experts one after the other, each stored whole (any gap between them: an expert store's
    # padded blobs read into one buffer)
    if lead and lead[0] > 1 and weight.stride(0) < matrix:
        return None
    if weight.stride()[-2:] == (out_features, 1) or out_features == 1:
        return "cols"
    if weight.stride()[-2:] == (1, in_features) or in_features == 1:
        return "rows"
    return None


def applies_experts(x: Tensor, *weights_EIO: Tensor) -> bool:
    """Whether ``experts_ffn`` (``cols_experts`` for the first layout) runs a token ``x`` (one
    row) through these [E, I, O] expert weights (the first one's I is x's features), all of one
    ``expert_layout``: ``applies``' conditions per matrix.

    NOTE: checked on every decode step of every layer, so without building per-expert views."""
    if not _one_row(x) or not weights_EIO or weights_EIO[0].dim() != 3 or weights_EIO[0].shape[1] != x.shape[-1]:
        return False
    layout = expert_layout(weights_EIO[0])
    return layout is not None and all(
        w.dim() == 3 and w.dtype in WEIGHT_DTYPES and expert_layout(w) == layout
        and _eligible(x, w, w.shape[1] * w.shape[2], (w.dtype,), contiguous=False)
        for w in weights_EIO
    )


def cols_experts(x_kI: Tensor, weight_EIO: Tensor, experts: list[int]) -> Tensor:
    """Row j of the result is ``x_kI[j] @ weight_EIO[experts[j]]``: a token's k experts in one
    kernel call (one thread wake-up), each product summed exactly as ``cols`` sums it. Check
    ``applies_experts`` first."""
    num_experts, in_features, out_features = weight_EIO.shape
    if len(experts) != x_kI.shape[0] or not all(0 <= e < num_experts for e in experts):
        raise ValueError(f"matvec.cols_experts: {x_kI.shape[0]} rows for experts {experts} of {num_experts}")
    matrix_bytes = in_features * out_features * weight_EIO.element_size()
    addresses = [weight_EIO.data_ptr() + e * matrix_bytes for e in experts]
    return _cols_batch(x_kI, addresses, weight_EIO.dtype, in_features, out_features, "cols_experts")


def applies_matrices(x: Tensor, *matrices_kIO: Sequence[Tensor]) -> bool:
    """Whether ``cols_matrices`` runs a token ``x`` (one row) through each list of [I, O]
    matrices (one per row of the batch; the first list's I is x's features): contiguous
    matrices of one shape and dtype per list, ``applies``' conditions on each.

    NOTE: checked on every decode step of every offloaded layer: the first matrix of a list
    stands for the list in ``_eligible``."""
    if not _one_row(x) or not matrices_kIO or not matrices_kIO[0] or matrices_kIO[0][0].shape[0] != x.shape[-1]:
        return False
    for matrices in matrices_kIO:
        if not matrices:
            return False
        first = matrices[0]
        if first.dim() != 2 or first.dtype not in WEIGHT_DTYPES:
            return False
        if any(m.shape != first.shape or m.dtype != first.dtype or not m.is_contiguous() for m in matrices):
            return False
        if not _eligible(x, first, first.numel(), (first.dtype,)):
            return False
    return True


def cols_matrices(x_kI: Tensor, matrices_kIO: Sequence[Tensor]) -> Tensor:
    """Row j of the result is ``x_kI[j] @ matrices_kIO[j]``: k separately stored [I, O]
    matrices (an offloaded layer's cached experts) in one kernel call, each product summed
    exactly as ``cols`` (and ``cols_experts``) sums it. Check ``applies_matrices`` first."""
    if len(matrices_kIO) != x_kI.shape[0]:
        raise ValueError(f"matvec.cols_matrices: {x_kI.shape[0]} rows for {len(matrices_kIO)} matrices")
    in_features, out_features = matrices_kIO[0].shape
    addresses = [matrix.data_ptr() for matrix in matrices_kIO]
    return _cols_batch(x_kI, addresses, matrices_kIO[0].dtype, in_features, out_features, "cols_matrices")


def _cols_batch(x_kI: Tensor, addresses: list[int], dtype: torch.dtype, in_features: int, out_features: int,
                caller: str) -> Tensor:
    suffix = "f32" if dtype == torch.float32 else "bf16"
    pointers = (ctypes.c_void_p * len(addresses))(*addresses)
    x_kI32 = x_kI.float().contiguous()
    y_kO = torch.empty(len(addresses), out_features, dtype=torch.float32)
    code = _kernel(f"moekit_cols_batch_{suffix}")(
        ctypes.cast(pointers, ctypes.c_void_p), x_kI32.data_ptr(), y_kO.data_ptr(), len(addresses), in_features,
        out_features, torch.get_num_threads(),
    )
    if code != 0:
        raise MemoryError(f"moekit.matvec.{caller}: could not allocate its scratch buffer")
    return y_kO if x_kI.dtype == torch.float32 else y_kO.to(x_kI.dtype)


def applies_attention_block(x: Tensor, w_qkv_OI: Tensor, w_proj_OI: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether ``attention_block`` runs this decode step: one token of the weights' dtype, an
    inference forward, contiguous CPU weights and [1, n_kv, capacity, head_dim] caches of that
    dtype."""
    dtype = w_qkv_OI.dtype
    return (
        _one_row(x) and dtype in WEIGHT_DTYPES and w_proj_OI.dtype == dtype and keys.dtype == dtype
        and values.dtype == dtype and keys.is_contiguous() and values.is_contiguous() and keys.shape[0] == 1
        and w_proj_OI.is_contiguous() and _eligible(x, w_qkv_OI, MIN_WEIGHT_ELEMENTS, (dtype,))
        and not (torch.is_grad_enabled() and w_proj_OI.requires_grad)
    )


def attention_block(
    x_D: Tensor, w_qkv_OI: Tensor, w_proj_OI: Tensor, g_attn_D: Tensor, g_ffn_D: Tensor, eps: float,
    cos_K: Tensor, sin_K: Tensor, keys: Tensor, values: Tensor, position: int, n_head: int,
) -> tuple[Tensor, Tensor]:
    """The attention half of a pre-norm block for one decoded token, in one C call (check
    ``applies_attention_block`` first): x' = x + W_proj·attention(RoPE(W_qkv·RMSNorm(x))) with
    the token's key and value written at ``position`` of ``keys`` / ``values`` ([1, n_kv,
    capacity, head_dim]), and h2 = RMSNorm(x') (the FFN's input). Returns (x', h2), [D] each in
    x's dtype. ``cos_K`` / ``sin_K``: the position's rotary angles [head_dim / 2]."""
    _, n_kv, capacity, head_dim = keys.shape
    d_model = x_D.shape[-1]
    if position >= capacity or n_head % n_kv or w_qkv_OI.shape != (d_model + 2 * n_kv * head_dim, d_model):
        raise ValueError(f"matvec.attention_block: position {position} of a cache of {capacity}, {n_head} heads "
                         f"over {n_kv} kv heads of {head_dim}, qkv weight {tuple(w_qkv_OI.shape)}")
    x32 = x_D.reshape(-1).float().contiguous()
    out = torch.empty(2, d_model, dtype=torch.float32)
    floats = [t.float().contiguous() for t in (g_attn_D, g_ffn_D, cos_K, sin_K)]
    code = _kernel("moekit_attn_block")(
        w_qkv_OI.data_ptr(), w_proj_OI.data_ptr(), floats[0].data_ptr(), floats[1].data_ptr(), eps,
        floats[2].data_ptr(), floats[3].data_ptr(), keys.data_ptr(), values.data_ptr(), capacity * head_dim,
        position, x32.data_ptr(), out[0].data_ptr(), out[1].data_ptr(), d_model, n_head, n_kv, head_dim,
        int(w_qkv_OI.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    if code != 0:
        raise MemoryError("moekit.matvec.attention_block: could not allocate its scratch buffers")
    out = out.to(x_D.dtype)
    return out[0], out[1]


# moekit.experts.activate's names → matvec.c's codes (experts_decode)
DECODE_ACTIVATIONS = {"swiglu": 0, "clamped_swiglu": 1, "gelu": 2, "relu": 3}


def experts_ffn(
    x: Tensor, w_in: Tensor | Sequence[Tensor], w_out: Tensor | Sequence[Tensor], experts: list[int], weight_k: Tensor,
    activation: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
    b_in: Tensor | Sequence[Tensor] | None = None, b_out: Tensor | Sequence[Tensor] | None = None,
) -> Tensor:
    """One token's routed experts, combined, in one C call: y = Σ_j weight_k[j] ·
    FFN_{experts[j]}(x), float32 [1, D] (moekit.experts.activate's nonlinearities; biases
    optional). The weights are either stacked [E, I, O] tensors (indexed by ``experts``, as
    ``GroupedExperts`` holds them; biases [E, H] / [E, D]) or lists of the k experts' own [I, O]
    matrices in order (an offloaded layer's cached experts; ``experts`` then only counts them).
    Check ``applies_experts`` (stacked) or ``applies_matrices`` (lists) first; ``activation``
    is one of moekit.config.ACTIVATIONS (``DECODE_ACTIVATIONS`` holds their C codes). Each expert's products are
    ``cols_experts``' sums; the activation and the combine are the PyTorch ops' formulas with
    the same roundings (bfloat16), summed in the assignment order."""
    stacked = isinstance(w_in, Tensor)

    def addresses(weights: Tensor | Sequence[Tensor] | None) -> Any:
        if weights is None:
            return None
        if isinstance(weights, Tensor):
            row_bytes = weights.stride(0) * weights.element_size()
            chosen = [weights.data_ptr() + e * row_bytes for e in experts]
        else:
            chosen = [t.data_ptr() for t in weights]
        return (ctypes.c_void_p * len(chosen))(*chosen)

    first_in = w_in[0]
    first_out = w_out[0]
    d_model, hidden = first_in.shape
    width = first_out.shape[0]
    k = len(experts)
    if (not stacked and (len(w_in) != k or len(w_out) != k)) or weight_k.numel() != k:
        raise ValueError(f"matvec.experts_ffn: {k} experts, {weight_k.numel()} weights")
    if activation not in DECODE_ACTIVATIONS:
        raise ValueError(f"matvec.experts_ffn: activation {activation!r} is not one of {sorted(DECODE_ACTIVATIONS)}")
    for biases in (b_in, b_out):
        if biases is not None and any(not b.is_contiguous() or b.dtype != first_in.dtype for b in biases):
            raise ValueError("matvec.experts_ffn: biases must be contiguous and of the weights' dtype")
    layout = _shared_layout(first_in, first_out, "experts_ffn")
    x32 = x.reshape(-1).float().contiguous()
    weights32 = weight_k.reshape(-1).float().contiguous()
    y = torch.empty(1, d_model, dtype=torch.float32)
    code = _kernel("moekit_experts_decode")(
        ctypes.cast(addresses(w_in), ctypes.c_void_p), ctypes.cast(addresses(w_out), ctypes.c_void_p),
        None if b_in is None else ctypes.cast(addresses(b_in), ctypes.c_void_p),
        None if b_out is None else ctypes.cast(addresses(b_out), ctypes.c_void_p),
        weights32.data_ptr(), x32.data_ptr(), y.data_ptr(), k, d_model, hidden, width,
        DECODE_ACTIVATIONS[activation], swiglu_alpha, swiglu_limit, int(first_in.dtype == torch.bfloat16),
        int(layout == "rows"), torch.get_num_threads(),
    )
    if code != 0:
        raise MemoryError("moekit.matvec.experts_ffn: could not allocate its scratch buffers")
    return y


def _shared_layout(w_in: Tensor, w_out: Tensor, caller: str) -> str:
    """The ``expert_layout`` both projections share; a ValueError naming ``caller`` otherwise."""
    layout = expert_layout(w_in)
    if layout is None or expert_layout(w_out) != layout:
        raise ValueError(f"matvec.{caller}: the weights must be all [I, O] or all [O, I] (transposed) matrices")
    return layout


def applies_router(x: Tensor, gate_weight_ED: Tensor) -> bool:
    """Whether ``route_experts_ffn`` routes this token: one row of float32 or bfloat16, a
    contiguous float32 or bfloat16 [E, D] gate, inference."""
    return (
        _one_row(x) and x.dtype in WEIGHT_DTYPES and gate_weight_ED.dim() == 2 and gate_weight_ED.is_contiguous()
        and gate_weight_ED.dtype in WEIGHT_DTYPES and gate_weight_ED.shape[1] == x.shape[-1]
        and _eligible(x, gate_weight_ED, MIN_WEIGHT_ELEMENTS, WEIGHT_DTYPES)
    )


def applies_routed_experts(x: Tensor, gate_weight_ED: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether ``route_experts_ffn`` runs this token through the router and these stacked
    experts: ``applies_router`` and ``applies_experts``."""
    return applies_router(x, gate_weight_ED) and applies_experts(x, w_in, w_out)


class RoutedToken(NamedTuple):
    """``route_experts_ffn``'s result: the layer's output and its routing, as the top-k router
    and the experts compute them."""

    y_1D: Tensor | None  # float32 (None from lm_decode, whose layers' outputs stay in C)
    expert_idx_K: Tensor  # long, in descending score order
    weight_K: Tensor  # float32 combine weights
    logits_1E: Tensor  # float32
    scores_1E: Tensor  # float32 softmax
    counts_E: Tensor  # long: how many of the k chose each expert


def route_experts_ffn(
    x: Tensor, gate_weight_ED: Tensor, gate_bias_E: Tensor | None, round_logits: bool, check_finite: bool, top_k: int,
    normalize: bool, scale: float, w_in: Tensor | None = None, w_out: Tensor | None = None, activation: str = "swiglu",
    swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, b_in: Tensor | None = None, b_out: Tensor | None = None,
) -> RoutedToken | None:
    """A decoded token through a whole MoE layer in one C call (check ``applies_routed_experts``
    first): moekit.routing.TopKRouter's softmax top-k (logits in float32 from x's values,
    rounded to bfloat16 when ``round_logits``; weights normalized over the k when
    ``normalize``, times ``scale``), then ``experts_ffn`` on the chosen experts of the stacked
    ``w_in`` / ``w_out``. Without experts (``w_in`` None; check ``applies_router``) only the
    routing, ``y_1D`` then undefined: experts held elsewhere (offloaded, quantized) run next,
    on the same choices. None when ``check_finite`` and a logit is NaN or inf (the caller
    raises)."""
    num_experts, d_model = gate_weight_ED.shape
    hidden = w_in.shape[2] if w_in is not None else 0
    width = w_out.shape[1] if w_out is not None else 0
    if not 1 <= top_k <= min(num_experts, 64) or activation not in DECODE_ACTIVATIONS or (
        w_in is not None and (w_out is None or w_in.shape[0] != num_experts)
    ):
        raise ValueError(f"matvec.route_experts_ffn: top-{top_k} of {num_experts} experts, activation {activation!r}, "
                         f"stacked experts {None if w_in is None else tuple(w_in.shape)}")
    layout = "cols" if w_in is None or w_out is None else _shared_layout(w_in, w_out, "route_experts_ffn")
    dtype = x.dtype if w_in is None else w_in.dtype
    for biases in (b_in, b_out):
        if biases is not None and (w_in is None or not biases.is_contiguous() or biases.dtype != dtype):
            raise ValueError("matvec.route_experts_ffn: expert biases must be contiguous [E, H] / [E, D] tensors of "
                             "the stacked weights' dtype")
    gate = gate_weight_ED
    gate_bias = None if gate_bias_E is None else gate_bias_E.to(gate.dtype).contiguous()
    x32 = x.reshape(-1).float().contiguous()
    floats = torch.empty(d_model + top_k + 2 * num_experts, dtype=torch.float32)
    longs = torch.empty(top_k + num_experts, dtype=torch.long)
    y, weight_K, logits, scores = floats.split([d_model, top_k, num_experts, num_experts])
    expert_idx_K, counts_E = longs.split([top_k, num_experts])
    element = dtype.itemsize
    code = _kernel("moekit_route_experts_decode")(
        gate.data_ptr(), None if gate_bias is None else gate_bias.data_ptr(), int(gate.dtype == torch.bfloat16),
        int(round_logits), int(check_finite), num_experts, top_k, int(normalize), scale,
        None if w_in is None else w_in.data_ptr(), None if w_out is None else w_out.data_ptr(),
        None if b_in is None else b_in.data_ptr(), None if b_out is None else b_out.data_ptr(),
        0 if w_in is None else w_in.stride(0) * element, 0 if w_out is None else w_out.stride(0) * element,
        x32.data_ptr(), y.data_ptr(), expert_idx_K.data_ptr(), weight_K.data_ptr(), logits.data_ptr(),
        scores.data_ptr(), counts_E.data_ptr(), d_model, hidden, width,
        DECODE_ACTIVATIONS[activation], swiglu_alpha, swiglu_limit, int(dtype == torch.bfloat16),
        int(layout == "rows"), torch.get_num_threads(),
    )
    if code == 1:
        return None
    if code != 0:
        raise MemoryError("moekit.matvec.route_experts_ffn: could not allocate its scratch buffers")
    return RoutedToken(y.view(1, d_model), expert_idx_K, weight_K, logits.view(1, -1), scores.view(1, -1), counts_E)


class DecodeLayer(NamedTuple):
    """One block's tensors for ``lm_decode``: its attention half's (``attention_block``'s, the
    norms' weights in float32, the cache buffers reserved for this token) and its MoE layer's
    (``route_experts_ffn``'s)."""

    w_qkv_OI: Tensor
    w_proj_OI: Tensor
    g_attn_D: Tensor  # float32
    g_ffn_D: Tensor  # float32
    keys: Tensor  # [1, n_kv, capacity, head_dim]
    values: Tensor
    gate_ED: Tensor
    gate_bias_E: Tensor | None
    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None


def lm_decode(
    x_D: Tensor, layers: Sequence[DecodeLayer], eps: float, cos_K: Tensor, sin_K: Tensor, position: int, n_head: int,
    round_logits: bool, check_finite: bool, top_k: int, normalize: bool, scale: float, activation: str,
    swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
) -> tuple[Tensor, list[RoutedToken]] | int:
    """A decoded token through every block of moekit's LM in one C call: for each layer, the
    ``attention_block`` call, the ``route_experts_ffn`` call on its FFN input and the residual
    add, with the same roundings (the same bits as calling them per layer). Every layer must
    have the same shapes, dtype, expert layout and MoE settings, and pass ``applies_*``'s checks
    (the caller checks). Returns the last block's output (float32 [D], values of the weights'
    dtype) and each layer's routing (``y_1D`` None), or the index of the first layer whose router
    logits hold a NaN or inf (``check_finite``)."""
    first = layers[0]
    num_layers = len(layers)
    _, n_kv, _, head_dim = first.keys.shape
    num_experts, d_model = first.gate_ED.shape
    hidden, width = first.w_in.shape[2], first.w_out.shape[1]
    dtype = first.w_in.dtype
    layout = expert_layout(first.w_in)
    element = dtype.itemsize

    def pointers(tensors: Sequence[Tensor | None]) -> Any:
        return (ctypes.c_void_p * num_layers)(*[None if t is None else t.data_ptr() for t in tensors])

    x32 = x_D.reshape(-1).float().contiguous()
    floats = torch.empty(num_layers * (top_k + 2 * num_experts), dtype=torch.float32)
    longs = torch.empty(num_layers * (top_k + num_experts), dtype=torch.long)
    weights, logits, scores = floats.split([num_layers * top_k, num_layers * num_experts, num_layers * num_experts])
    ids, counts = longs.split([num_layers * top_k, num_layers * num_experts])
    strides = (ctypes.c_int64 * num_layers)(*[layer.keys.stride(1) for layer in layers])
    cos32, sin32 = cos_K.float().contiguous(), sin_K.float().contiguous()
    code = _kernel("moekit_lm_decode")(
        num_layers, pointers([layer.w_qkv_OI for layer in layers]), pointers([layer.w_proj_OI for layer in layers]),
        pointers([layer.g_attn_D for layer in layers]), pointers([layer.g_ffn_D for layer in layers]), eps,
        cos32.data_ptr(), sin32.data_ptr(), pointers([layer.keys for layer in layers]),
        pointers([layer.values for layer in layers]), strides, position, n_head, n_kv, head_dim,
        pointers([layer.gate_ED for layer in layers]),
        None if first.gate_bias_E is None else pointers([layer.gate_bias_E for layer in layers]),
        int(first.gate_ED.dtype == torch.bfloat16), int(round_logits), int(check_finite), num_experts, top_k,
        int(normalize), scale, pointers([layer.w_in for layer in layers]), pointers([layer.w_out for layer in layers]),
        None if first.b_in is None else pointers([layer.b_in for layer in layers]),
        None if first.b_out is None else pointers([layer.b_out for layer in layers]),
        first.w_in.stride(0) * element, first.w_out.stride(0) * element, x32.data_ptr(), ids.data_ptr(),
        weights.data_ptr(), logits.data_ptr(), scores.data_ptr(), counts.data_ptr(), d_model, hidden, width,
        DECODE_ACTIVATIONS[activation], swiglu_alpha, swiglu_limit, int(dtype == torch.bfloat16),
        int(layout == "rows"), torch.get_num_threads(),
    )
    if code >= 2:
        return code - 2
    if code != 0:
        raise MemoryError("moekit.matvec.lm_decode: could not allocate its scratch buffers")
    routed = [
        RoutedToken(
            None, ids[i * top_k : (i + 1) * top_k], weights[i * top_k : (i + 1) * top_k],
            logits[i * num_experts : (i + 1) * num_experts].view(1, -1),
            scores[i * num_experts : (i + 1) * num_experts].view(1, -1),
            counts[i * num_experts : (i + 1) * num_experts],
        )
        for i in range(num_layers)
    ]
    return x32, routed


def applies_int8_experts(x: Tensor, qweights_in: Sequence[Tensor], qweights_out: Sequence[Tensor]) -> bool:
    """Whether ``experts_ffn_int8`` runs a token ``x`` (one row, float32 or bfloat16) through
    these int8 experts: ``applies_int8``'s conditions for every projection."""
    if not _one_row(x) or x.dtype not in WEIGHT_DTYPES or not qweights_in or len(qweights_in) != len(qweights_out):
        return False
    for q_in, q_out in zip(qweights_in, qweights_out, strict=True):
        if q_in.dim() != 2 or q_out.dim() != 2 or q_in.dtype != torch.int8 or q_out.dtype != torch.int8:
            return False
        if q_in.shape[1] != x.shape[-1] or not q_in.is_contiguous() or not q_out.is_contiguous():
            return False
    first_in, first_out = qweights_in[0], qweights_out[0]
    return _eligible(x, first_in, first_in.numel(), WEIGHT_DTYPES) and first_out.numel() >= MIN_WEIGHT_ELEMENTS


def experts_ffn_int8(
    x: Tensor, qweights_in: Sequence[Tensor], scales_in: Sequence[Tensor], qweights_out: Sequence[Tensor],
    scales_out: Sequence[Tensor], weight_k: Tensor, activation: str, swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0, b_in: Sequence[Tensor] | None = None, b_out: Sequence[Tensor] | None = None,
) -> Tensor:
    """``experts_ffn`` for int8 experts (one scale per output channel, ``rows_int8``'s contract):
    the k experts ([out, in] int8 weights, float32 scales and float32 biases, in order) and
    their weighted sum in one C call, float32 [1, D], each product rounded to x's dtype as the
    per-expert calls round it. Check ``applies_int8_experts`` first."""
    k = len(qweights_in)
    if weight_k.numel() != k or not (len(scales_in) == len(scales_out) == len(qweights_out) == k):
        raise ValueError(f"matvec.experts_ffn_int8: {k} experts, {weight_k.numel()} weights")
    if activation not in DECODE_ACTIVATIONS:
        raise ValueError(
            f"matvec.experts_ffn_int8: activation {activation!r} is not one of {sorted(DECODE_ACTIVATIONS)}"
        )
    hidden, d_model = qweights_in[0].shape
    width = qweights_out[0].shape[1]
    floats = [t.float().contiguous() for t in (*scales_in, *scales_out, *(b_in or ()), *(b_out or ()))]

    def pointers(tensors: Sequence[Tensor]) -> Any:
        return ctypes.cast((ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors)), ctypes.c_void_p)

    x32 = x.reshape(-1).float().contiguous()
    weights32 = weight_k.reshape(-1).float().contiguous()
    y = torch.empty(1, d_model, dtype=torch.float32)
    code = _kernel("moekit_experts_decode_i8")(
        pointers(qweights_in), pointers(floats[:k]), pointers(qweights_out), pointers(floats[k : 2 * k]),
        None if b_in is None else pointers(floats[2 * k : 3 * k]),
        None if b_out is None else pointers(floats[len(floats) - k :]),
        weights32.data_ptr(), x32.data_ptr(), y.data_ptr(), k, d_model, hidden, width, DECODE_ACTIVATIONS[activation],
        swiglu_alpha, swiglu_limit, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    if code != 0:
        raise MemoryError("moekit.matvec.experts_ffn_int8: could not allocate its scratch buffers")
    return y


def vecmat(x: Tensor, weight_IO: Tensor) -> Tensor:
    """``x @ weight_IO``: through ``cols`` when it applies, ``rows`` on a transposed [O, I]
    matrix (``expert_layout`` "rows"), else torch's matmul."""
    if applies(x, weight_IO):
        return cols(x, weight_IO)
    if weight_IO.dim() == 2 and applies(x, weight_IO.T):
        return rows(x, weight_IO.T)
    return x @ weight_IO


def linear(x: Tensor, weight_OI: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``: through ``rows`` when it applies (one row, inference), else torch's."""
    if not applies(x, weight_OI):
        return F.linear(x, weight_OI, bias)
    y = rows(x, weight_OI)
    return y if bias is None else y + bias


class DecodeLinear(nn.Linear):
    """``nn.Linear`` whose one-row inference forward reads its weight with ``matvec.rows``;
    the same parameters, state dict and every other behaviour."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_decode_linears(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a ``DecodeLinear`` (in place, the
    class only: parameters, hooks and names stay); returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = DecodeLinear
            count += 1
    return count
