"""Quantize / dequantize through the bitsandbytes functional API, stored as plain tensors.

A quantized matrix is kept as two tensors that live in the model's ``state_dict`` (so the Trainer's safetensors
checkpoints carry them): ``data`` (uint8: packed 4-bit codes, or 8-bit codes) and ``absmax`` (float32, one per block).
Shape, block size and code table are fixed by the config, so nothing else needs saving. All of this runs on CPU with
bitsandbytes 0.50 (``dequantize_4bit(..., out=...)`` does not, hence the ``QuantState`` built here).
"""

from __future__ import annotations

import math
from math import prod

import torch

__all__ = ["dequantize", "dequantize_rows", "quantize", "row_alignment"]


def _functional():
    import bitsandbytes.functional as bnb_functional

    return bnb_functional


def quantize(weight: torch.Tensor, quant: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, absmax)`` of ``weight`` (quantized from float32)."""
    F = _functional()
    w = weight.detach().float().contiguous()
    if quant in ("nf4", "fp4"):
        data, state = F.quantize_4bit(w, blocksize=block_size, quant_type=quant)
    elif quant == "int8":
        data, state = F.quantize_blockwise(w, blocksize=block_size)
    else:
        raise ValueError(f"quant must be one of nf4, fp4, int8; got {quant!r}")
    return data, state.absmax.float()


def dequantize(
    data: torch.Tensor, absmax: torch.Tensor, quant: str, shape: tuple[int, ...], block_size: int
) -> torch.Tensor:
    """The float32 matrix of ``shape`` stored in ``(data, absmax)``.

    4-bit codes are dequantized as one flat vector, then reshaped: bitsandbytes 0.50's native CPU kernel, given a
    2-D shape, misreads the blocks when the last dimension is an odd multiple of 32 (a 512 x 1376 NF4 weight, LLaMA
    60M's down projection, came back with 2.2x the quantization error; tests/test_loqt.py pins the flat reading
    against a reference written in torch)."""
    F = _functional()
    if quant in ("nf4", "fp4"):
        state = F.QuantState(
            absmax=absmax,
            shape=torch.Size([prod(shape)]),
            dtype=torch.float32,
            blocksize=block_size,
            quant_type=quant,
            code=F.get_4bit_type(quant, device=data.device),
        )
        return F.dequantize_4bit(data, state).view(shape)
    if quant == "int8":
        code = _dynamic_map(data.device)
        state = F.QuantState(absmax=absmax, code=code, blocksize=block_size, dtype=torch.float32)
        return F.dequantize_blockwise(data, state)
    raise ValueError(f"quant must be one of nf4, fp4, int8; got {quant!r}")


def row_alignment(width: int, block_size: int) -> int:
    """The fewest rows of ``width`` values that end on a quantization block: row blocks that are multiples of it
    start on a block, so each can be dequantized from its own slice (:func:`dequantize_rows`)."""
    return block_size // math.gcd(width, block_size)


def dequantize_rows(
    data: torch.Tensor, absmax: torch.Tensor, quant: str, shape: tuple[int, int], block_size: int, start: int, stop: int
) -> torch.Tensor:
    """Rows ``start:stop`` of the float32 matrix of ``shape`` stored in ``(data, absmax)``, read from their slice of
    the codes (int8: one per value; nf4 / fp4: two per byte) and of the absmax (one per ``block_size`` values); the
    same values as ``dequantize(...)[start:stop]``. ``start`` must be a multiple of :func:`row_alignment`."""
    width = shape[1]
    if start % row_alignment(width, block_size):
        raise ValueError(f"start={start} does not begin a quantization block of {width}-wide rows")
    codes = data.reshape(-1)
    if quant == "int8":
        codes = codes[start * width : stop * width].view(stop - start, width)
    else:
        codes = codes[start * width // 2 : -(-stop * width // 2)].unsqueeze(1)
    scales = absmax[start * width // block_size : -(-stop * width // block_size)]
    return dequantize(codes, scales, quant, (stop - start, width), block_size)


_DYNAMIC_MAPS: dict[torch.device, torch.Tensor] = {}


def _dynamic_map(device: torch.device) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code table (what ``quantize_blockwise`` uses by default), cached."""
    if device not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[device] = _functional().create_dynamic_map(signed=True).to(device)
    return _DYNAMIC_MAPS[device]
