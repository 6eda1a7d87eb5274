"""TuneQDM: memory-efficient fine-tuning of quantized diffusion models.

Ryu, Lim, Shim, "Memory-Efficient Fine-Tuning for Quantized Diffusion Model"
(arXiv 2401.04339, ECCV 2024); PEQA (Kim et al., NeurIPS 2023) as the baseline mode.
"""

from .config import QuantConfig
from .experts import ScaleRouter, expert_index
from .layers import QuantConv2d, QuantizedLayer, QuantLinear
from .model import enable_timestep_experts, get_router, quantize_, quantized_layers
from .scaletable import ScaleTable

__all__ = [
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "ScaleRouter",
    "ScaleTable",
    "enable_timestep_experts",
    "expert_index",
    "get_router",
    "quantize_",
    "quantized_layers",
]
__version__ = "0.1.0"
