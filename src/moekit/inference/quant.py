"""Quantized experts on CPU: int8 per output channel and int4 in groups of 128, computed by
PyTorch's own CPU kernels, with a dequantize-and-matmul fallback.

Shape suffixes: M rows (tokens of one expert), K a projection's input width, N its output
width, G groups along K (K / group_size), D d_model, H the first projection's width (2F for
SwiGLU), F the expert hidden size, E experts.

A moekit expert computes ``x @ w_in[e]`` ([D, H]) and ``act @ w_out[e]`` ([F, D]); each
projection is quantized as a linear layer's weight ``w_NK`` (= the [K, N] matrix transposed),
because that is the layout both kernels read:

- **int8**, symmetric per output channel: ``w[n, k] ≈ q[n, k] · scale[n]``, q in [-127, 127],
  scale = max_k |w[n, k]| / 127. Symmetric because ``torch._weight_int8pack_mm(x_MK, q_NK,
  scale_N)`` has no zero point, and trained weights are centred on 0.
- **int4**, asymmetric in groups of ``group_size`` (128) along K, the tinygemm convention the
  kernel implements: ``w[n, k] ≈ (q[n, k] - 8) · scale[g, n] + zero[g, n]``, q in [0, 15],
  g = k // group_size, scale = (max - min) / 15 and zero = min + 8 · scale over the group.
  Asymmetric because the kernel takes a zero per group anyway (no extra bytes or work), and a
  min..max grid uses all 16 levels on a skewed group where a symmetric ±max grid wastes the
  side the group does not reach (and one level of 16, for ±7).
  ``torch._weight_int4pack_mm_for_cpu(x_MK, packed, group_size, scale_and_zero_GN2)`` reads q
  pre-packed by ``torch._convert_weight_to_int4pack_for_cpu``.

Scales and zeros are bfloat16, the kernels' dtype for bf16 activations; quantization rounds
them to bf16 first and picks q against the rounded values, so the stored numbers are exactly
what is multiplied. Activations of another dtype (float32, float16) run the same kernels with
the scales cast up (exact). Quality on a trained moekit model: docs/offload.md.

The int4 packed layout is not portable: PyTorch packs rows in blocks of 64 with an AVX-512
lane interleave, of 32 on AVX2, and in plain pairs otherwise (aten/src/ATen/native/cpu/
int4mm_kernel.cpp, ``weight_to_int4pack_kernel``). ``int4_layout()`` finds out which one this
build uses by packing a probe and comparing it with the three known layouts (and checks one
product against the dequantized reference); a blob records its layout, and ``from_bytes``
repacks it when the machine's differs. Where a kernel is missing, its shape constraints are
not met (int8: K % 16; int4: K % group_size, N % 16; the kernels read out of bounds
otherwise), or the layout is unknown, the projection dequantizes and runs a plain matmul.

The per-expert API the expert store uses: ``quantize_expert(w_in_DH, w_out_FD, ...)`` →
``QuantizedExpert``; ``expert.to_bytes()`` / ``QuantizedExpert.from_bytes(buffer)`` (exact
round trip; ``from_bytes`` keeps a view of a writable buffer, copies a read-only one);
``expert(x_MD)`` → [M, D]. ``quantize_experts(model, "int8" | "int4")`` swaps every MoE layer's
``GroupedExperts`` for ``QuantizedExperts`` in place (inference only).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit import matvec
from moekit.experts import GroupedExperts, ModuleExperts, activate, combine_assignments
from moekit.layer import MoE, moe_layers

__all__ = [
    "SCHEMES",
    "QuantizedExpert",
    "QuantizedExperts",
    "QuantizedLinear",
    "QuantizationQuality",
    "int4_layout",
    "kernel_status",
    "quantization_quality",
    "quantize_expert",
    "quantize_experts",
    "quantize_linear",
]

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the CPU int4 kernel implements
INT8_KERNEL_K_MULTIPLE = 16  # the int8 kernel's vector loop has no K tail: it reads past K
INT4_KERNEL_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
SCALE_DTYPE = torch.bfloat16

_int8_mm = getattr(torch, "_weight_int8pack_mm", None)
_int4_mm = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
_int4_pack = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)


# --------------------------------------------------------------------------------------------
# The int4 packed layouts (aten/src/ATen/native/cpu/int4mm_kernel.cpp)
# --------------------------------------------------------------------------------------------

# Row blocks of block_n rows are packed one after the other, each as [K, block_n / 2] bytes;
# byte j of row k of a block holds q[low[j], k] in its low nibble and q[high[j], k] in its high
# one. A full block uses the layout's interleave, a shorter last block (N % block_n rows) and
# every block of "pairs" holds rows (0, 1), (2, 3), ...
INT4_LAYOUTS = {"avx512": 64, "avx2": 32, "pairs": 32}


def _nibble_rows(layout: str, rows: int) -> tuple[list[int], list[int]]:
    """(low, high): which rows of a block of ``rows`` go into the low and high nibbles."""
    if layout == "avx512" and rows == 64:  # lanes 0|2 and 1|3 of 16 rows each
        return list(range(0, 32)), list(range(32, 64))
    if layout == "avx2" and rows == 32:
        return list(range(0, 16)), list(range(16, 32))
    return list(range(0, rows, 2)), list(range(1, rows, 2))


def pack_int4(q_NK: Tensor, layout: str) -> Tensor:
    """q in [0, 15] ([N, K], any integer dtype) → the kernel's packed bytes, uint8 [N, K / 2]."""
    num_rows, k = q_NK.shape
    block_n = INT4_LAYOUTS[layout]
    q_NK = q_NK.to(torch.uint8)
    blocks = []
    for start in range(0, num_rows, block_n):
        block_nK = q_NK[start : start + block_n]
        low, high = _nibble_rows(layout, block_nK.shape[0])
        blocks.append(((block_nK[high].t() << 4) | block_nK[low].t()).reshape(-1))
    return torch.cat(blocks).reshape(num_rows, k // 2)


def unpack_int4(packed_NK2: Tensor, layout: str) -> Tensor:
    """The inverse of ``pack_int4``: uint8 [N, K / 2] → q, uint8 [N, K]."""
    num_rows, half_k = packed_NK2.shape
    k = 2 * half_k
    block_n = INT4_LAYOUTS[layout]
    flat = packed_NK2.reshape(-1)
    q_NK = torch.empty(num_rows, k, dtype=torch.uint8)
    offset = 0
    for start in range(0, num_rows, block_n):
        rows = min(block_n, num_rows - start)
        block_Kh = flat[offset : offset + k * rows // 2].reshape(k, rows // 2)
        offset += k * rows // 2
        low, high = _nibble_rows(layout, rows)
        q_NK[start + torch.tensor(low)] = (block_Kh & 0x0F).t()
        q_NK[start + torch.tensor(high)] = (block_Kh >> 4).t()
    return q_NK


@functools.cache
def int4_layout() -> str | None:
    """The packed layout of this build's ``_convert_weight_to_int4pack_for_cpu``, or None when
    the int4 kernel is missing, packs in a layout this module does not know, or computes
    something other than the tinygemm dequantization (then int4 runs the fallback)."""
    if _int4_mm is None or _int4_pack is None:
        return None
    # 112 rows: one full block of 64 (or three of 32) and a short last block on every layout.
    generator = torch.Generator().manual_seed(0)
    q_NK = torch.randint(0, 16, (112, 64), generator=generator, dtype=torch.int32)
    try:
        packed = _int4_pack(q_NK, 1)
    except RuntimeError:
        return None
    for layout in INT4_LAYOUTS:
        if torch.equal(packed.view(torch.uint8).reshape(-1), pack_int4(q_NK, layout).reshape(-1)):
            break
    else:
        return None
    scale_and_zero_GN2 = torch.rand(2, 112, 2, generator=generator).to(SCALE_DTYPE)
    x_MK = torch.randn(3, 64, generator=generator)
    weight_NK = _dequantize_int4(q_NK, scale_and_zero_GN2, 32)
    try:
        got_MN = _int4_mm(x_MK, packed, 32, scale_and_zero_GN2.float())
    except RuntimeError:
        return None
    if not torch.allclose(got_MN, x_MK @ weight_NK.t(), rtol=1e-4, atol=1e-4):
        return None
    return layout


def kernel_status() -> dict[str, str]:
    """Per scheme, the kernel used where shapes allow, or why the fallback runs."""
    int8 = "torch._weight_int8pack_mm" if _int8_mm is not None else "fallback: torch._weight_int8pack_mm missing"
    if matvec.available():
        int8 += "; one row (decoding): moekit.matvec.rows_int8"
    layout = int4_layout()
    if layout is not None:
        int4 = f"torch._weight_int4pack_mm_for_cpu ({layout} packed layout)"
    elif _int4_mm is None or _int4_pack is None:
        int4 = "fallback: torch._weight_int4pack_mm_for_cpu or _convert_weight_to_int4pack_for_cpu missing"
    else:
        int4 = "fallback: this build's int4 packed layout or numerics are not the known ones"
    return {"int8": int8, "int4": int4}


# --------------------------------------------------------------------------------------------
# One quantized projection
# --------------------------------------------------------------------------------------------


def _dequantize_int4(q_NK: Tensor, scale_and_zero_GN2: Tensor, group_size: int) -> Tensor:
    """(q - 8) · scale + zero per group, float32 [N, K]."""
    num_rows, k = q_NK.shape
    scale_NG1 = scale_and_zero_GN2[..., 0].t().float()[..., None]
    zero_NG1 = scale_and_zero_GN2[..., 1].t().float()[..., None]
    q_NGS = q_NK.float().reshape(num_rows, k // group_size, group_size)
    return ((q_NGS - 8) * scale_NG1 + zero_NG1).reshape(num_rows, k)


@dataclass
class QuantizedLinear:
    """One projection ``x_MK → x_MK @ w_NK.T``, quantized.

    int8: ``qweight`` int8 [N, K], ``scales`` bf16 [N]. int4: ``qweight`` uint8 [N, K / 2] in
    ``layout`` (see ``pack_int4``), ``scales`` bf16 [G, N, 2] (scale, zero).
    """

    scheme: str
    in_features: int  # K
    out_features: int  # N
    qweight: Tensor
    scales: Tensor
    group_size: int = 0  # int4 only
    layout: str = ""  # int4 only

    def __post_init__(self) -> None:
        self._scales_by_dtype: dict[torch.dtype, Tensor] = {}

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def kernel_applies(self) -> bool:
        """Whether ``matmul(impl="auto")`` runs PyTorch's kernel (else dequantize + matmul)."""
        if self.scheme == "int8":
            return _int8_mm is not None and self.in_features % INT8_KERNEL_K_MULTIPLE == 0
        return (
            int4_layout() == self.layout
            and self.out_features % INT4_KERNEL_N_MULTIPLE == 0
            and self.group_size in INT4_GROUP_SIZES
        )

    def dequantize(self) -> Tensor:
        """The weight the quantized numbers stand for, float32 [N, K]."""
        if self.scheme == "int8":
            return self.qweight.float() * self.scales.float()[:, None]
        return _dequantize_int4(unpack_int4(self.qweight, self.layout), self.scales, self.group_size)

    def _scales_as(self, dtype: torch.dtype) -> Tensor:
        # NOTE: bf16 → float32 is exact; → float16 is exact too except for scales below
        # float16's normal range (~6e-5), which it rounds.
        if dtype not in self._scales_by_dtype:
            self._scales_by_dtype[dtype] = self.scales.to(dtype)
        return self._scales_by_dtype[dtype]

    def matmul(self, x_MK: Tensor, impl: str = "auto") -> Tensor:
        """x_MK @ w_NK.T in x's dtype: [M, N]. ``impl`` "auto" (the kernel where it applies)
        or "dequant" (dequantize to x's dtype, then a plain matmul: the fallback)."""
        if impl not in ("auto", "dequant"):
            raise ValueError(f"impl={impl!r} is invalid: use auto or dequant")
        if x_MK.shape[-1] != self.in_features:
            raise ValueError(f"input has {x_MK.shape[-1]} features but the projection takes {self.in_features}")
        if impl == "auto" and self.scheme == "int8" and matvec.applies_int8(x_MK, self.qweight):
            # One row (decoding): moekit's streaming kernel, the same contract as PyTorch's.
            return matvec.rows_int8(x_MK, self.qweight, self._scales_as(torch.float32))
        if impl == "auto" and self.kernel_applies() and x_MK.dtype in (torch.bfloat16, torch.float16, torch.float32):
            x_MK = x_MK.contiguous()
            if self.scheme == "int8":
                return _int8_mm(x_MK, self.qweight, self._scales_as(x_MK.dtype))
            return _int4_mm(x_MK, self.qweight, self.group_size, self._scales_as(x_MK.dtype))
        return x_MK @ self.dequantize().to(x_MK.dtype).t()


def quantize_linear(weight_NK: Tensor, scheme: str, group_size: int = 128) -> QuantizedLinear:
    """Quantize a linear layer's weight [N outputs, K inputs] (see the module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is invalid: use {' or '.join(SCHEMES)}")
    if weight_NK.dim() != 2 or not weight_NK.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {weight_NK.dtype} {tuple(weight_NK.shape)}")
    num_rows, k = weight_NK.shape
    w_NK = weight_NK.detach().float().cpu().contiguous()
    if not torch.isfinite(w_NK).all():
        raise ValueError("weight holds NaN or inf; it cannot be quantized")
    if scheme == "int8":
        # NOTE: the scale is rounded to bf16 before q is chosen, so q · scale is the weight the
        # kernel multiplies; rounding it up keeps every |w| / scale <= 127 (no clamping).
        scale_N = (w_NK.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        scale_N = _round_up_bf16(scale_N)
        q_NK = torch.round(w_NK / scale_N[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedLinear("int8", k, num_rows, q_NK, scale_N.to(SCALE_DTYPE))
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is invalid for int4: use one of {INT4_GROUP_SIZES}")
    if k % group_size != 0:
        raise ValueError(
            f"int4 needs the input width to be a multiple of group_size={group_size}, got {k} "
            f"(weight shape {tuple(weight_NK.shape)}); use a group_size that divides it"
        )
    w_NGS = w_NK.reshape(num_rows, k // group_size, group_size)
    low_NG, high_NG = w_NGS.amin(dim=-1), w_NGS.amax(dim=-1)
    scale_NG = _round_up_bf16(((high_NG - low_NG) / 15).clamp(min=torch.finfo(torch.float32).tiny))
    zero_NG = (low_NG + 8 * scale_NG).to(SCALE_DTYPE).float()
    q_NGS = torch.round((w_NGS - zero_NG[..., None]) / scale_NG[..., None] + 8).clamp(0, 15)
    q_NK = q_NGS.reshape(num_rows, k).to(torch.int32)
    scale_and_zero_GN2 = torch.stack([scale_NG, zero_NG], dim=-1).transpose(0, 1).contiguous().to(SCALE_DTYPE)
    layout = int4_layout()
    if layout is not None and num_rows % INT4_KERNEL_N_MULTIPLE == 0:
        packed = _int4_pack(q_NK, 1).view(torch.uint8).reshape(num_rows, k // 2)
    else:
        layout = layout or "pairs"
        packed = pack_int4(q_NK, layout)
    return QuantizedLinear("int4", k, num_rows, packed.contiguous(), scale_and_zero_GN2, group_size, layout)


def _round_up_bf16(values: Tensor) -> Tensor:
    """The smallest bf16 number >= each value, as float32."""
    rounded = values.to(SCALE_DTYPE).float()
    below = rounded < values
    if below.any():
        bumped = torch.nextafter(rounded[below].to(SCALE_DTYPE), torch.tensor(float("inf"), dtype=SCALE_DTYPE))
        rounded[below] = bumped.float()
    return rounded


# --------------------------------------------------------------------------------------------
# One quantized expert, and its bytes
# --------------------------------------------------------------------------------------------

BLOB_MAGIC = b"MKQE"
BLOB_VERSION = 1
_TENSOR_ALIGN = 64  # every tensor's offset in a blob; the store aligns blobs to 4 KiB


class QuantizedExpert:
    """One expert FFN with quantized projections: ``expert(x_MD) → [M, D]`` in x's dtype.

    ``w_in`` maps D → H, ``w_out`` F → D; the optional float32 biases ``b_in`` [H], ``b_out``
    [D] are GPT-OSS's. ``activation`` and the SwiGLU parameters are the layer config's.
    """

    def __init__(
        self,
        w_in: QuantizedLinear,
        w_out: QuantizedLinear,
        activation: str,
        b_in: Tensor | None = None,
        b_out: Tensor | None = None,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ) -> None:
        self.w_in, self.w_out = w_in, w_out
        self.activation = activation
        self.b_in, self.b_out = b_in, b_out
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit

    @property
    def scheme(self) -> str:
        return self.w_in.scheme

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors in memory (the blob adds a header and alignment)."""
        biases = sum(b.numel() * b.element_size() for b in (self.b_in, self.b_out) if b is not None)
        return self.w_in.nbytes + self.w_out.nbytes + biases

    def __call__(self, x_MD: Tensor, impl: str = "auto") -> Tensor:
        h_MH = self.w_in.matmul(x_MD, impl)
        if self.b_in is not None:
            h_MH = h_MH + self.b_in.to(h_MH.dtype)
        act_MF = activate(h_MH, self.activation, self.swiglu_alpha, self.swiglu_limit)
        out_MD = self.w_out.matmul(act_MF, impl)
        if self.b_out is not None:
            out_MD = out_MD + self.b_out.to(out_MD.dtype)
        return out_MD

    def _tensors(self) -> dict[str, Tensor]:
        tensors = {
            "w_in.qweight": self.w_in.qweight,
            "w_in.scales": self.w_in.scales,
            "w_out.qweight": self.w_out.qweight,
            "w_out.scales": self.w_out.scales,
        }
        if self.b_in is not None:
            tensors["b_in"] = self.b_in
        if self.b_out is not None:
            tensors["b_out"] = self.b_out
        return tensors

    def to_bytes(self) -> bytes:
        """One self-describing blob: magic ``MKQE``, u32 version, u32 header length, a JSON
        header (scheme, activation, per projection its shapes, group size and int4 layout, per
        tensor dtype/shape/offset), then the tensors, each at a 64-byte aligned offset."""
        tensors = self._tensors()
        entries, offset = {}, 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            dtype = str(tensor.dtype).removeprefix("torch.")
            entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "offset": offset}
            offset += -(-nbytes // _TENSOR_ALIGN) * _TENSOR_ALIGN
        header = {
            "scheme": self.scheme,
            "activation": self.activation,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "projections": {
                name: {
                    "in_features": p.in_features, "out_features": p.out_features,
                    "group_size": p.group_size, "layout": p.layout,
                }
                for name, p in (("w_in", self.w_in), ("w_out", self.w_out))
            },
            "tensors": entries,
        }
        header_bytes = json.dumps(header, sort_keys=True).encode()
        prefix = BLOB_MAGIC + struct.pack("<II", BLOB_VERSION, len(header_bytes)) + header_bytes
        payload_start = -(-len(prefix) // _TENSOR_ALIGN) * _TENSOR_ALIGN
        out = bytearray(payload_start + offset)
        out[: len(prefix)] = prefix
        for name, tensor in tensors.items():
            raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            start = payload_start + entries[name]["offset"]
            out[start : start + len(raw)] = raw
        return bytes(out)

    @classmethod
    def from_bytes(cls, buffer: bytes | bytearray | memoryview) -> QuantizedExpert:
        """The expert ``to_bytes`` wrote. The tensors are views of a writable buffer (no copy:
        keep it alive, do not reuse it); a read-only one (``bytes``) is copied once. An int4
        blob packed in another machine's layout is repacked for this one. Raises ValueError
        on a blob that is not one, is truncated or has an unknown version."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            view = memoryview(bytearray(view))
        if len(view) < 12 or bytes(view[:4]) != BLOB_MAGIC:
            raise ValueError("not a quantized expert blob (bad magic)")
        version, header_length = struct.unpack("<II", view[4:12])
        if version != BLOB_VERSION:
            raise ValueError(
                f"quantized expert blob version {version} is not supported (this moekit reads {BLOB_VERSION})"
            )
        if 12 + header_length > len(view):
            raise ValueError(f"quantized expert blob truncated: {len(view)} bytes, header needs {12 + header_length}")
        try:
            header = json.loads(bytes(view[12 : 12 + header_length]))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"quantized expert blob has a corrupt header ({error})") from error
        payload_start = -(-(12 + header_length) // _TENSOR_ALIGN) * _TENSOR_ALIGN
        tensors = {}
        for name, entry in header["tensors"].items():
            dtype = getattr(torch, entry["dtype"])
            count = 1
            for size in entry["shape"]:
                count *= size
            start = payload_start + entry["offset"]
            end = start + count * dtype.itemsize
            if end > len(view):
                raise ValueError(
                    f"quantized expert blob truncated: tensor {name} ends at byte {end}, blob has {len(view)}"
                )
            if count:
                flat = torch.frombuffer(view, dtype=torch.uint8, count=end - start, offset=start)
            else:
                flat = torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype).reshape(entry["shape"])
        projections = []
        for name in ("w_in", "w_out"):
            spec = header["projections"][name]
            linear = QuantizedLinear(
                header["scheme"], spec["in_features"], spec["out_features"], tensors[f"{name}.qweight"],
                tensors[f"{name}.scales"], spec["group_size"], spec["layout"],
            )
            projections.append(_relayout(linear))
        return cls(
            projections[0], projections[1], header["activation"], tensors.get("b_in"), tensors.get("b_out"),
            header["swiglu_alpha"], header["swiglu_limit"],
        )


def _relayout(linear: QuantizedLinear) -> QuantizedLinear:
    """An int4 projection packed for another CPU, repacked for this one's kernel."""
    here = int4_layout()
    if linear.scheme != "int4" or here is None or linear.layout == here:
        return linear
    if linear.out_features % INT4_KERNEL_N_MULTIPLE != 0:
        return linear  # the kernel cannot run it here anyway; the fallback reads any layout
    q_NK = unpack_int4(linear.qweight, linear.layout).to(torch.int32)
    packed = _int4_pack(q_NK, 1).view(torch.uint8).reshape(linear.out_features, linear.in_features // 2)
    return QuantizedLinear(
        "int4", linear.in_features, linear.out_features, packed, linear.scales, linear.group_size, here
    )


def quantize_expert(
    w_in_DH: Tensor,
    w_out_FD: Tensor,
    scheme: str,
    activation: str,
    group_size: int = 128,
    b_in_H: Tensor | None = None,
    b_out_D: Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> QuantizedExpert:
    """One expert of ``GroupedExperts`` (``w_in[e]``, ``w_out[e]``, biases when present)."""
    return QuantizedExpert(
        quantize_linear(w_in_DH.t(), scheme, group_size),
        quantize_linear(w_out_FD.t(), scheme, group_size),
        activation,
        None if b_in_H is None else b_in_H.detach().float().cpu().clone(),
        None if b_out_D is None else b_out_D.detach().float().cpu().clone(),
        swiglu_alpha,
        swiglu_limit,
    )


# --------------------------------------------------------------------------------------------
# A MoE layer's experts, quantized
# --------------------------------------------------------------------------------------------


def experts_one_token(
    experts: Sequence[QuantizedExpert], x_1D: Tensor, token_idx_N: Tensor, weight_N: Tensor, impl: str = "auto"
) -> Tensor:
    """One token's k quantized experts, combined, float32 [1, D]: int8 experts in one
    ``matvec.experts_ffn_int8`` call where it applies (the per-expert calls' products and
    roundings, the nonlinearity and the weighted sum in C), else each expert's call and the
    local dispatcher's float32 index_add. The in-memory and the offloaded quantized layers both
    decode through here, so their sums are the same."""
    first = experts[0]
    if (
        impl == "auto" and first.scheme == "int8"
        and all(e.scheme == "int8" and (e.b_in is None) == (first.b_in is None)
                and (e.b_out is None) == (first.b_out is None) for e in experts)
        and matvec.applies_int8_experts(x_1D, [e.w_in.qweight for e in experts], [e.w_out.qweight for e in experts])
    ):
        return matvec.experts_ffn_int8(
            x_1D, [e.w_in.qweight for e in experts], [e.w_in._scales_as(torch.float32) for e in experts],
            [e.w_out.qweight for e in experts], [e.w_out._scales_as(torch.float32) for e in experts], weight_N,
            first.activation, first.swiglu_alpha, first.swiglu_limit,
            None if first.b_in is None else [e.b_in for e in experts],
            None if first.b_out is None else [e.b_out for e in experts],
        )
    out_kD = torch.cat([expert(x_1D, impl) for expert in experts])
    return combine_assignments(out_kD, token_idx_N, weight_N, 1, fusable=False)


class QuantizedExperts(nn.Module):
    """Drop-in for ``GroupedExperts`` at inference: ``forward(x_ND, group_ends_E, counts)``
    runs each non-empty expert on its rows (grouped by expert, as the dispatcher sends them),
    so prefill does one kernel call per projection per expert, and batch-1 decoding k of them.

    The MoE layer takes its generic (dispatch → experts → combine) path for these experts, and
    for one token (decoding) its fast path (``forward_per_assignment``: no sorting or grouping,
    the same expert calls and the same combine, so the same sums). The quantized tensors are
    plain attributes, not parameters: they are not in ``state_dict()`` and ``model.to(...)``
    leaves them on the CPU.
    """

    one_token_fast_path = True  # moekit.layer.MoE's decode fast path, for one token

    def __init__(self, experts: Sequence[QuantizedExpert], impl: str = "auto") -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("QuantizedExperts needs at least one expert, got 0")
        self.experts = list(experts)
        self.num_experts = len(self.experts)
        self.impl = impl

    @classmethod
    def from_grouped(cls, grouped: GroupedExperts, scheme: str, group_size: int = 128) -> QuantizedExperts:
        config = grouped.config
        return cls([
            quantize_expert(
                grouped.w_in[e], grouped.w_out[e], scheme, grouped.activation, group_size,
                None if grouped.b_in is None else grouped.b_in[e],
                None if grouped.b_out is None else grouped.b_out[e],
                config.swiglu_alpha, config.swiglu_limit,
            )
            for e in range(grouped.num_experts)
        ])

    @property
    def scheme(self) -> str:
        return self.experts[0].scheme

    @property
    def nbytes(self) -> int:
        return sum(expert.nbytes for expert in self.experts)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, experts={self.num_experts}, impl={self.impl}"

    def forward_per_assignment(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, weight_N: Tensor
    ) -> Tensor:
        """One token's output, float32 [1, D]: each of its experts on the token's row (the call
        ``forward`` makes), combined as the local dispatcher combines (float32 index_add), so
        equal bit for bit to the generic path."""
        if x_TD.shape[0] != 1:
            raise ValueError(f"QuantizedExperts.forward_per_assignment takes one token, got {x_TD.shape[0]}")
        chosen = [self.experts[e] for e in expert_idx_N.tolist()]
        with torch.no_grad():
            return experts_one_token(chosen, x_TD, token_idx_N, weight_N, self.impl)

    def forward(self, x_ND: Tensor, group_ends_E: Tensor, counts: Sequence[int]) -> Tensor:
        if len(counts) != self.num_experts:
            raise ValueError(f"QuantizedExperts holds {self.num_experts} experts but got counts for {len(counts)}")
        out_ND = x_ND.new_empty(x_ND.shape)
        start = 0
        with torch.no_grad():
            for expert, count in zip(self.experts, counts, strict=True):
                if count:
                    out_ND[start : start + count] = expert(x_ND[start : start + count], self.impl)
                start += count
        return out_ND


def quantize_experts(model: nn.Module, scheme: str, group_size: int = 128) -> list[str]:
    """Replace every MoE layer's ``GroupedExperts`` inside ``model`` by ``QuantizedExperts``
    (in place; inference only) and return the names of the layers changed. A layer whose
    experts are other modules is left as it is only when they are MoE layers themselves
    (their own experts are quantized); any other is an error, as is a model without MoE layers."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is invalid: use {' or '.join(SCHEMES)}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to quantize")
    changed = []
    for name, layer in layers:
        experts = layer.experts
        if isinstance(experts, QuantizedExperts):
            raise ValueError(f"MoE layer {name or '<model>'} is already quantized ({experts.scheme})")
        if isinstance(experts, ModuleExperts):
            if all(isinstance(module, MoE) for module in experts.experts):
                continue
            raise ValueError(
                f"MoE layer {name or '<model>'} has custom expert modules; only GroupedExperts can be quantized"
            )
        if not isinstance(experts, GroupedExperts):
            raise ValueError(
                f"MoE layer {name or '<model>'} has experts of type {type(experts).__name__}; "
                "only GroupedExperts can be quantized"
            )
        layer.experts = QuantizedExperts.from_grouped(experts, scheme, group_size)
        changed.append(name)
    return changed


# --------------------------------------------------------------------------------------------
# Quality: perplexity change and top-1 agreement against the unquantized model
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizationQuality:
    scheme: str
    tokens: int  # predicted positions compared
    perplexity: float  # quantized model
    reference_perplexity: float  # unquantized model
    perplexity_change: float  # perplexity / reference_perplexity - 1 (0.004 = +0.4%)
    top1_agreement: float  # fraction of positions with the same argmax token

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def quantization_quality(
    model: nn.Module,
    windows_BS1: Sequence[Tensor],
    schemes: Sequence[str] = SCHEMES,
    group_size: int = 128,
) -> list[QuantizationQuality]:
    """Per scheme, perplexity and top-1 agreement of a quantized copy of ``model`` (an LM whose
    ``forward(idx_BS)`` returns ``(logits_BSV, ...)``) against ``model`` itself on held-out
    windows [B, S + 1] of token ids (inputs are [:, :-1], targets [:, 1:]). ``model`` is not
    changed (each scheme quantizes a deep copy)."""
    import copy

    import torch.nn.functional as F

    def evaluate(lm: nn.Module) -> tuple[list[Tensor], float, int]:
        argmax, nll, count = [], 0.0, 0
        for window_BS1 in windows_BS1:
            logits_BSV = lm(window_BS1[:, :-1])[0].float()
            targets_BS = window_BS1[:, 1:]
            nll += F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="sum").item()
            count += targets_BS.numel()
            argmax.append(logits_BSV.argmax(dim=-1))
        return argmax, nll, count

    if not windows_BS1:
        raise ValueError("quantization_quality needs at least one window of held-out tokens")
    was_training = model.training
    model.eval()
    try:
        ref_argmax, ref_nll, count = evaluate(model)
        reports = []
        for scheme in schemes:
            quantized = copy.deepcopy(model)
            quantize_experts(quantized, scheme, group_size)
            argmax, nll, _ = evaluate(quantized)
            same = sum(int((a == b).sum()) for a, b in zip(argmax, ref_argmax, strict=True))
            ppl, ref_ppl = float(torch.tensor(nll / count).exp()), float(torch.tensor(ref_nll / count).exp())
            reports.append(QuantizationQuality(scheme, count, ppl, ref_ppl, ppl / ref_ppl - 1, same / count))
    finally:
        model.train(was_training)
    return reports
