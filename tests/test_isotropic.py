"""The isotropic backbone of the ablation: each mixer's block against its reference on shared weights.

References (timm): the VisionTransformer block (attention), MLP-Mixer's MixerBlock (mlp), MetaFormer's
block with PoolFormer's Pooling (pool), with an identity token mixer (identity) and with a depthwise
conv (conv), whose op is also checked against timm's ConvMixer's depthwise conv. Blocks are compared
in eval mode, fp32, to 1e-5.
"""

from functools import partial

import pytest
import torch
from timm.layers import LayerNorm2d
from timm.models.convmixer import ConvMixer as TimmConvMixer
from timm.models.metaformer import MetaFormerBlock, Pooling
from timm.models.mlp_mixer import MixerBlock
from timm.models.vision_transformer import Block as TimmViTBlock
from torch import nn

from patchbench import study as cp
from patchbench.models import create_model
from patchbench.models.isotropic import MIXERS, STEMS, Isotropic, _grid, _tokens

DIM, GRID, B = 32, 6, 3


def our_block(mixer: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Isotropic(mixer=mixer, stem="patch", dim=DIM, depth=1, patch_size=4, img_size=4 * GRID, num_heads=4,
                      kernel_size=5)
    for p in model.parameters():  # not the init values, which may hide a swapped weight
        nn.init.normal_(p, std=0.2)
    return model.blocks[0].eval()


def load_mapped(reference: nn.Module, ours: nn.Module, mapping: dict[str, str]) -> None:
    """Copy our weights into `reference` (reference key -> our key), reshaping 1x1 convs from linears."""
    mine = ours.state_dict()
    state = {}
    for ref_key, ref_value in reference.state_dict().items():
        key = ref_key
        for a, b in mapping.items():
            key = key.replace(a, b)
        state[ref_key] = mine[key].reshape(ref_value.shape)
    reference.load_state_dict(state)
    reference.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, GRID * GRID, DIM, generator=torch.Generator().manual_seed(seed))


def test_attention_block_is_timms_vit_block():
    ours = our_block("attention")
    ref = TimmViTBlock(DIM, num_heads=4, mlp_ratio=4.0, qkv_bias=True)
    load_mapped(ref, ours, {"attn.": "mixer."})
    x = tokens()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_mlp_block_is_timms_mixer_block():
    ours = our_block("mlp")
    ref = MixerBlock(DIM, seq_len=GRID * GRID, mlp_ratio=(0.5, 4.0))
    load_mapped(ref, ours, {"mlp_tokens.": "mixer.mlp.", "mlp_channels.": "mlp."})
    x = tokens()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def depthwise(dim, proj_drop=0.0, **kw):
    return nn.Conv2d(dim, dim, 5, groups=dim, padding="same")


@pytest.mark.parametrize("mixer, token_mixer, mapping", [
    ("pool", Pooling, {}),
    ("identity", lambda dim, proj_drop=0.0, **kw: nn.Identity(), {}),
    ("conv", depthwise, {"token_mixer.": "mixer.conv."}),
])
def test_grid_mixers_are_metaformer_blocks(mixer, token_mixer, mapping):
    """MetaFormer's block (norm -> token mixer -> residual, norm -> MLP -> residual) on NCHW maps, with
    our LayerNorm over channels and GELU MLP: the same block as ours on the (B, N, C) tokens."""
    ours = our_block(mixer)
    ref = MetaFormerBlock(DIM, token_mixer=token_mixer, mlp_act=nn.GELU, mlp_bias=True,
                          norm_layer=partial(LayerNorm2d, eps=1e-6))
    load_mapped(ref, ours, mapping)
    x = tokens()
    torch.testing.assert_close(ours(x), _tokens(ref(_grid(x, GRID))), atol=1e-5, rtol=0)


def test_conv_mixing_is_convmixers_depthwise_conv():
    ours = our_block("conv").mixer
    timm = TimmConvMixer(dim=DIM, depth=1, kernel_size=5, patch_size=4, num_classes=10)
    conv = timm.blocks[0][0].fn[0]  # Residual(depthwise conv -> GELU -> BN): its conv
    conv.load_state_dict(ours.conv.state_dict())
    x = tokens()
    torch.testing.assert_close(ours(x), _tokens(conv(_grid(x, GRID))), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("stem", STEMS)
def test_every_cell_builds_trains_and_keeps_the_token_grid(mixer, stem):
    model = create_model(f"iso_{mixer}_{stem}", num_classes=7, dim=32, depth=2, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert model.stem(x).shape == (2, 32, 4, 4)  # 32px in 8x8 patches: a 4x4 grid, whichever stem
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_cells_differ_only_in_mixer_and_stem():
    names = {name for name, _ in Isotropic(mixer="pool", stem="patch").named_parameters()}
    for mixer in MIXERS:
        other = {n for n, _ in Isotropic(mixer=mixer, stem="patch").named_parameters()}
        assert {n for n in other ^ names if ".mixer." not in n} == set()  # the same parts around the mixer
    conv_stem = {n for n, _ in Isotropic(mixer="pool", stem="conv").named_parameters()}
    assert {n for n in conv_stem ^ names if not n.startswith("stem.")} == set()


@pytest.mark.parametrize("measure, budget", [("params", 500_000),
                                             pytest.param("macs", 100_000_000, marks=pytest.mark.slow)])
def test_every_cell_is_matched_to_the_budget(measure, budget):
    for mixer in MIXERS:
        for stem in STEMS:
            _overrides, size = cp.match_budget(f"iso_{mixer}_{stem}", budget, num_classes=10, img_size=64,
                                              measure=measure)
            assert abs(size - budget) <= 0.05 * budget


def test_attention_with_heads_that_do_not_divide_dim_works_in_whole_heads():
    cell = Isotropic(mixer="attention", stem="patch", dim=30, num_heads=4, depth=1, img_size=32)
    attn = cell.blocks[0].mixer
    assert attn.head_dim == 7 and attn.qkv.out_features == 3 * 28 and attn.proj.in_features == 28
    assert cell(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="mixer must be one of"):
        Isotropic(mixer="fft", stem="patch")
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        Isotropic(mixer="pool", stem="conv", patch_size=6, img_size=48)
