"""bitsandbytes' quantized linears as LoRA bases (QLoRA): ``Linear4bit`` (NF4 or FP4) and
``Linear8bitLt`` (LLM.int8()).

A quantized weight is one more kind of base behind the base-weight seam
(``layers/base.py``): the forward runs bitsandbytes' own op for ``W x`` and adds
``s·B(A x)`` with float32 adapters as on any Linear. In training, a 4-bit layer whose
input has its compute dtype (no autocast) takes the one-node path of ``layers/fused.py``
like a dense Linear: bitsandbytes' 4-bit product without autograd forward, and ``g W`` in
backward from W dequantized into a temporary, so only the packed 4-bit weight is saved
(:class:`Base4bit`). An 8-bit layer keeps the plain ops: LLM.int8() quantizes each input
row and splits outlier columns inside its own autograd function, with state kept on the
layer, which the one-node path would have to reimplement; :meth:`dense_weight` dequantizes (for
DoRA's norm, merges and the dense export); :meth:`write_weight` quantizes again, which
rounds to the 4-bit (or 8-bit) grid, so merging into it is refused unless asked for
(:attr:`merge_loss`, :func:`~lora_lightning.merge.merge_lora`).

bitsandbytes is optional: its types are registered once it is imported (a model holding
one imported it), and nothing here imports it before that.

On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for inference the first
time it runs in eval mode without autograd, and a forward with autograd afterwards fails
(an in-place add on a leaf); it also fails to repack a layer with fewer than 32 outputs.
A layer that carries (or carried) an adapter keeps the weight in its trainable layout: a
packed one is unpacked when the layer is adapted, and the repacking stays off, also after
``unload_lora``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from .types import MatmulLoRA, _made, register_layer_type, register_lazily

__all__ = ["Base4bit", "QuantizedLinearLoRA", "dense_quantized_weight", "is_quantized_linear",
           "quantized_classes", "quantize_weight"]

LOSS_4BIT = ("writing W + ΔW back in 4 bits rounds every weight to one of 16 levels per "
             "block of 64 (NF4 steps of about a tenth of the block's largest weight), which is "
             "coarser than most LoRA updates, and unmerging cannot give the adapter back exactly")
LOSS_8BIT = ("writing W + ΔW back in 8 bits rounds every weight to 1/127 of its row's largest "
             "weight, and unmerging cannot give the adapter back exactly")


def _bnb() -> Any:
    """The bitsandbytes module if it is imported, else ``None`` (never imports it)."""
    return sys.modules.get("bitsandbytes")


def quantized_classes() -> tuple[type, ...]:
    """bitsandbytes' quantized linear types (``()`` while bitsandbytes is not imported)."""
    bnb = _bnb()
    if bnb is None or not hasattr(bnb, "nn"):
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear (adapted or not)."""
    classes = quantized_classes()
    return bool(classes) and isinstance(module, classes)


def _unpack_cpu_layout(module: nn.Module) -> None:
    """Put a 4-bit weight that bitsandbytes repacked for CPU inference back in its stored
    layout (see the module docstring)."""
    qs = getattr(module.weight, "quant_state", None)
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, qs)
        module.quant_state = module.weight.quant_state


def dense_quantized_weight(module: nn.Module) -> Tensor:
    """The dequantized (out, in) weight of a bitsandbytes linear, float32."""
    import bitsandbytes.functional as bf

    weight = module.weight
    if isinstance(module, _bnb().nn.Linear4bit):
        _unpack_cpu_layout(module)
        return bf.dequantize_4bit(weight.data, weight.quant_state).float()
    state = module.state
    cb = weight.CB if weight.CB is not None else weight.data
    scb = weight.SCB if weight.SCB is not None else state.SCB
    return bf.int8_vectorwise_dequant(cb, scb).float()


def quantize_weight(module: nn.Module, value: Tensor, kind: str | None = None) -> None:
    """Store ``value`` (dense, (out, in)) as ``module``'s quantized weight: a bitsandbytes
    ``Linear4bit`` with ``kind`` ``"nf4"``/``"fp4"`` (double quantization, blocks of 64) or a
    ``Linear8bitLt`` (``kind`` ``"int8"``). Deterministic: the same dense weight gives the
    same bytes. ``kind`` defaults to the module's own."""
    bnb = _bnb()
    device = value.device if module.weight.device.type == "meta" else module.weight.device
    if isinstance(module, bnb.nn.Linear4bit):
        old = module.weight
        kind = kind or old.quant_type
        param = bnb.nn.Params4bit(
            value.detach().to(module.compute_dtype or value.dtype).contiguous().clone(),
            requires_grad=False, blocksize=getattr(old, "blocksize", None) or 64,
            compress_statistics=getattr(old, "compress_statistics", True),
            quant_type=kind, quant_storage=getattr(old, "quant_storage", torch.uint8),
            module=module)
        module.weight = param._quantize(device)
        return
    param = bnb.nn.Int8Params(value.detach().to(device).contiguous().clone(),
                              requires_grad=False, has_fp16_weights=False)
    module.weight = param._quantize(device)
    module.state.CB = module.state.SCB = None


class Base4bit:
    """:class:`~lora_lightning.layers.fused.BaseOp` of a bitsandbytes 4-bit weight (the
    packed bytes, with their quantization state): ``x Wᵀ + b`` is bitsandbytes' own
    4-bit product, and ``g W`` dequantizes W into a temporary of ``g``'s dtype (what
    bitsandbytes' own backward does), so no dense copy of W outlives the call."""

    def __init__(self, quant_state: Any) -> None:
        self.quant_state = quant_state

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        import bitsandbytes as bnb

        with torch.no_grad():
            return bnb.matmul_4bit(x, w, quant_state=self.quant_state, bias=bias)

    def input_grad(self, g: Tensor, w: Tensor) -> Tensor:
        import bitsandbytes.functional as bf

        return g.mm(bf.dequantize_4bit(w, self.quant_state).to(g.dtype))


class QuantizedLinearLoRA(MatmulLoRA):
    """LoRA on a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (see the module docstring).
    The base computes in its compute dtype; adapters default to float32."""

    can_fold = False  # the base product stays bitsandbytes' own op
    merge_loss = LOSS_4BIT

    def fusable(self, x: Tensor, name: str) -> bool:
        """The one-node path (:class:`Base4bit`) for an input in the layer's compute dtype,
        without autocast (bitsandbytes' product does not follow autocast) and in the
        weight's stored layout; otherwise the plain ops."""
        qs = getattr(self.weight, "quant_state", None)
        if (qs is None or self.weight.requires_grad or getattr(qs, "packing_format_for_cpu", False)
                or torch.is_autocast_enabled(x.device.type)):
            return False
        dtype = getattr(self, "compute_dtype", None)
        return x.dtype == dtype and (self.bias is None or self.bias.dtype == dtype)

    def fused_base(self) -> tuple[Tensor, Base4bit]:
        return self.weight.data, Base4bit(self.weight.quant_state)

    def _lora_setup(self) -> None:
        super()._lora_setup()
        if "support_avx512bf16_for_cpu" in self.__dict__:  # Linear4bit
            # kept off after unload_lora too: the repacked layout breaks a later training
            # step, and bitsandbytes 0.50 fails to repack layers with fewer than 32 outputs
            self.support_avx512bf16_for_cpu = False
            _unpack_cpu_layout(self)

    def base_2d(self, x2: Tensor) -> Tensor:
        return self.base_forward(x2)

    def lora_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, a, b):
        return b.float() @ a.float()

    def base_without_bias(self, x):
        out = self.base_forward(x)
        return out if self.bias is None else out - self.bias.to(out.dtype)

    def magnitude_shape(self):
        return (self.out_features,)

    def base_dtype(self) -> torch.dtype:
        dtype = getattr(self, "compute_dtype", None)
        if dtype is None and self.bias is not None:
            dtype = self.bias.dtype
        return dtype if dtype is not None else torch.float32

    def dense_weight(self) -> Tensor:
        return dense_quantized_weight(self)

    @torch.no_grad()
    def write_weight(self, value: Tensor) -> None:
        quantize_weight(self, value.to(self.base_dtype()))

    @torch.no_grad()
    def dequantize_base(self, dtype: torch.dtype = torch.float32) -> None:
        """Become a dense ``LoRALinear`` of ``dtype`` with the dequantized weight, adapters
        and hooks kept (merging into it then loses nothing)."""
        from .types import LoRALinear

        dense = self.dense_weight().to(dtype)
        for attr in ("quant_state", "compute_dtype",
                     "compute_type_is_set", "quant_storage", "support_avx512bf16_for_cpu",
                     "state", "index"):
            self.__dict__.pop(attr, None)
        self.__class__ = LoRALinear
        self.weight = nn.Parameter(dense, requires_grad=False)
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)


class Quantized8bitLoRA(QuantizedLinearLoRA):
    """``Linear8bitLt``: the same, with int8 rows and a float scale per row."""

    can_fuse = False  # LLM.int8() runs its own op (see the module docstring)
    merge_loss = LOSS_8BIT

    def base_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32


def register_bitsandbytes() -> None:
    """Register LoRA types for bitsandbytes' linears once bitsandbytes is imported."""
    bnb = _bnb()
    if bnb is None or not hasattr(bnb, "nn"):
        return
    from .types import _TYPES

    for base, lora, name in ((bnb.nn.Linear4bit, QuantizedLinearLoRA, "LoRALinear4bit"),
                             (bnb.nn.Linear8bitLt, Quantized8bitLoRA, "LoRALinear8bitLt")):
        if base not in _TYPES:
            register_layer_type(base, _made(lora, base, name))


register_lazily(register_bitsandbytes)

