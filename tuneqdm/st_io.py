"""Deterministic safetensors writing.

The safetensors library writes its metadata map in hash order, so saving the same
tensors twice can give different bytes. Artefacts here must round-trip bit-exactly
(and be comparable by hash), so this writes the same format with sorted keys:
an 8-byte little-endian header length, the JSON header (space-padded to 8 bytes),
then the tensors' bytes in name order. Files are read back with the safetensors
library itself.
"""

from __future__ import annotations

import json

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of `tensors` (CPU, any shape) with sorted, stable header."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name} has unsupported dtype {tensor.dtype}")
        data = tensor.view(torch.uint8).reshape(-1).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)
