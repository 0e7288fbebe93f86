"""Parameter and MAC counts.

MACs (multiply-accumulates) are counted with `torch.utils.flop_counter`, which counts the FLOPs of
convolutions, linear layers, matrix products and attention; MACs = FLOPs / 2. Normalisation,
activations, pooling and additions are not counted (the usual convention). We say MACs everywhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """MACs of one eval-mode forward pass on a single `in_chans` x `img_size` x `img_size` image.

    The input goes on the model's device and dtype; a model on the "meta" device is counted without
    computing anything (what `patchbench models` does, so large sizes cost nothing). The model is
    restored to its previous train/eval mode afterwards.
    """
    first = next(model.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else ("cpu", torch.float32)
    x = torch.zeros(1, in_chans, img_size, img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        # The math attention backend and grad mode make every attention visible to the counter:
        # CPU's fused attention kernel and nn.MultiheadAttention's no-grad fast path are not counted.
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
