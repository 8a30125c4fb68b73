"""LoRA layer types: the layer contract (``base``), the built-in types and their registry
(``types``), ``nn.MultiheadAttention`` (``mha``), bitsandbytes' quantized linears
(``quantized``) and adapter variants such as DoRA
(``variants``). See ``docs/extending.md`` to add a layer type or a variant."""

from .base import ADAPTER_NAME, ADAPTER_PARAM_NAMES, DEFAULT_ADAPTER, AdapterSpec, LoRALayer
from .mha import LoRAMultiheadAttention, block_fast_paths, unblock_fast_paths
from .quantized import dense_quantized_weight, is_quantized_linear, quantize_weight
from .types import (
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAEmbedding,
    LoRALinear,
    hf_conv1d_type,
    layer_types,
    lora_type_for,
    register_layer_type,
    registered_type,
)
from .variants import VARIANTS, DoRA, LoRAVariant, variant_for

__all__ = ["ADAPTER_NAME", "ADAPTER_PARAM_NAMES", "DEFAULT_ADAPTER", "VARIANTS", "AdapterSpec",
           "DoRA", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAEmbedding", "LoRALayer",
           "LoRALinear", "LoRAMultiheadAttention", "LoRAVariant", "block_fast_paths", "dense_quantized_weight",
           "hf_conv1d_type", "is_quantized_linear", "layer_types", "lora_type_for", "register_layer_type",
           "quantize_weight", "registered_type", "unblock_fast_paths", "variant_for"]
