"""The toy world's VAE: an AutoencoderKL whose weights are set by hand, not trained,
so that it is an exact per-pixel linear colour transform (no downsampling).

32x32x3 images <-> 32x32x4 latents, z = COLOUR_TO_LATENT @ rgb; `build_vae` says how
the weights do it and why the base does not use a trained, downsampling VAE.
"""

from __future__ import annotations

import math

import torch

from .world import IMAGE_SIZE

# Latent channels from RGB: three orthonormal columns of the 4x4 Hadamard matrix / 2, so
# z = COLOUR_TO_LATENT @ rgb and rgb = COLOUR_TO_LATENT.T @ z exactly.
COLOUR_TO_LATENT = 0.5 * torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0],
                                       [1.0, 1.0, -1.0], [1.0, -1.0, -1.0]])  # (4, 3)
_BIG = 1000.0  # the constant carried next to each signal through the GroupNorms
_LOG_VARIANCE = -20.0  # posterior std exp(-10) ~ 4.5e-5


def build_vae():
    """An AutoencoderKL that is an exact per-pixel linear colour transform (factor 1).

    32x32x3 images <-> 32x32x4 latents, z = COLOUR_TO_LATENT @ rgb. The weights are set,
    not trained: every residual branch is zeroed (so resnets are identities), convs use
    only their centre tap, and each colour channel c travels through the final
    GroupNorm of encoder and decoder in a group [c, -c, K, -K] (K = 1000): the group
    mean is exactly 0 and its std is K / sqrt(2) to within 5e-7 whatever the image, so
    GroupNorm with gain K / sqrt(2) passes c through, and SiLU(c) - SiLU(-c) = c undoes
    the SiLU after it. Round trip error is ~1e-5.

    Why not a trained, downsampling VAE: small AutoencoderKLs (0.16-0.6 M parameters,
    factor 2) trained for 10-15 CPU minutes here reconstructed only ~95% of pixels to
    the right palette colour and lost most of the first world's 2-px patterns (pattern
    score 0.40-0.44), which would cap subject fidelity. Factor 1 makes the UNet run
    at 32x32 (four levels instead of three: ~1.2x the cost per step).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    gain = _BIG / math.sqrt(2.0)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)

        def carry(conv, source: torch.Tensor) -> None:
            """conv's output groups: [c, -c, K, -K] for c = source @ input, then K, -K, K, -K."""
            centre = conv.kernel_size[0] // 2
            for colour in range(3):
                conv.weight[4 * colour, :, centre, centre] = source[colour]
                conv.weight[4 * colour + 1, :, centre, centre] = -source[colour]
                conv.bias[4 * colour + 2], conv.bias[4 * colour + 3] = _BIG, -_BIG
            conv.bias[12:] = torch.tensor([_BIG, -_BIG, _BIG, -_BIG])

        def emit(norm, conv, target: torch.Tensor) -> None:
            """norm + SiLU + conv: output k = sum_c target[k, c] * c."""
            norm.weight.zero_()
            for colour in range(3):
                norm.weight[4 * colour: 4 * colour + 2] = gain
            centre = conv.kernel_size[0] // 2
            for colour in range(3):
                conv.weight[: len(target), 4 * colour, centre, centre] = target[:, colour]
                conv.weight[: len(target), 4 * colour + 1, centre, centre] = -target[:, colour]

        carry(vae.encoder.conv_in, torch.eye(3))
        emit(vae.encoder.conv_norm_out, vae.encoder.conv_out, COLOUR_TO_LATENT)
        vae.encoder.conv_out.bias[4:] = _LOG_VARIANCE
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(8)
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(4)
        carry(vae.decoder.conv_in, COLOUR_TO_LATENT.T)
        emit(vae.decoder.conv_norm_out, vae.decoder.conv_out, torch.eye(3))
    return vae.eval()
