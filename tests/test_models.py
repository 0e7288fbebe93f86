"""The model zoo: agreement with timm/torchvision on shared weights, every registered model's basics,
the study's exact parameter counts, clear errors, and MAC counting."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.models.convmixer import ConvMixer as TimmConvMixer
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from patchbench.errors import UserError
from patchbench.flops import count_macs, count_params
from patchbench.models import create_model, list_models
from patchbench.models.convmixer import ConvMixer
from patchbench.models.vit import ViT

BIG = {"convmixer_768_32", "convmixer_1536_20"}  # checked at 32px only, to keep the suite fast


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model: nn.Module) -> nn.Module:
    """Random weights and BN statistics, so a comparison exercises every parameter and buffer."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1 if p.ndim > 1 else 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def copy_by_position(src: nn.Module, dst: nn.Module, convert=None) -> None:
    """Load src's state into dst, matching entries by order; shapes must agree after `convert`."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert len(src_sd) == len(dst_sd), (list(src_sd), list(dst_sd))
    new = {}
    for (ks, v), (kd, target) in zip(src_sd.items(), dst_sd.items()):
        v = convert(ks, v) if convert else v
        assert v.shape == target.shape, (ks, kd, v.shape, target.shape)
        new[kd] = v
    dst.load_state_dict(new, strict=True)


def assert_same_outputs(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    ours.eval(), ref.eval()
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


# --- agreement with reference implementations -------------------------------------------------

@pytest.mark.parametrize("name,img_size,act", [
    ("convmixer_256_8", 32, nn.GELU),
    ("convmixer_256_12", 64, nn.GELU),
])
def test_registered_convmixer_matches_timm(name, img_size, act):
    ours = randomize(create_model(name))
    ref = TimmConvMixer(dim=256, depth=len(ours.blocks), kernel_size=ours.blocks[0][0].fn[0].kernel_size[0],
                        patch_size=ours.stem[0].stride[0], num_classes=10, act_layer=act)
    copy_by_position(ours, ref)
    assert_same_outputs(ours, ref, torch.randn(2, 3, img_size, img_size))


def test_relu_convmixer_matches_timm():
    # convmixer_768_32's shape (ReLU, k7, p7) at a small width and depth
    ours = randomize(ConvMixer(dim=48, depth=3, kernel_size=7, patch_size=7, activation="relu"))
    ref = TimmConvMixer(dim=48, depth=3, kernel_size=7, patch_size=7, num_classes=10, act_layer=nn.ReLU)
    copy_by_position(ours, ref)
    assert_same_outputs(ours, ref, torch.randn(2, 3, 56, 56))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernel_convmixer_matches_timm():
    # 'same' padding with an even kernel pads asymmetrically; both must pad the same way
    ours = randomize(ConvMixer(dim=16, depth=2, kernel_size=4, patch_size=3))
    ref = TimmConvMixer(dim=16, depth=2, kernel_size=4, patch_size=3, num_classes=10)
    copy_by_position(ours, ref)
    assert_same_outputs(ours, ref, torch.randn(2, 3, 30, 30))


@pytest.mark.parametrize("img_size", [64, 160])
def test_resnet18_matches_torchvision(img_size):
    ours = randomize(create_model("resnet18"))
    ref = torchvision.models.resnet18(num_classes=10)
    copy_by_position(ours, ref)
    assert_same_outputs(ours, ref, torch.randn(2, 3, img_size, img_size))


def test_vit_matches_timm():
    ours = randomize(create_model("vit_tiny_6l8h"))
    ref = TimmViT(img_size=160, patch_size=16, embed_dim=128, depth=6, num_heads=8, mlp_ratio=2.0,
                  num_classes=10)
    copy_by_position(ours, ref)
    assert_same_outputs(ours, ref, torch.randn(2, 3, 160, 160))


def test_seed_vit_matches_timm():
    # Linear(48, 128) on (p1 p2 c)-flattened patches == a 4x4/4 conv with the weight reordered;
    # nn.MultiheadAttention's packed in_proj == timm's qkv; LayerNorm eps is PyTorch's default.
    ours = randomize(create_model("notebook_vit"))
    ref = TimmViT(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=8, mlp_ratio=2.0,
                  num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-5))

    def convert(key, v):
        return v.reshape(128, 4, 4, 3).permute(0, 3, 1, 2) if key == "patch_embed.weight" else v

    copy_by_position(ours, ref, convert)
    assert_same_outputs(ours, ref, torch.randn(2, 3, 32, 32))


# --- every registered model -------------------------------------------------------------------

def sizes_for(name: str) -> list[int]:
    natural = create_model(name, num_classes=7).default_img_size if name not in BIG else 32
    return sorted({32, natural})


CASES = [(name, size) for name in list_models() for size in sizes_for(name)]


@pytest.mark.parametrize("name,img_size", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_every_model_shape_finite_and_gradients(name, img_size):
    model = create_model(name, num_classes=7, img_size=img_size).train()
    for p_name, p in model.named_parameters():
        if p_name.endswith("gain"):  # notebook_convmixer's residual gains start at 0, which would zero the
            nn.init.constant_(p, 0.5)  # depthwise branch's gradient; any other value reaches every parameter
    x = torch.randn(2, 3, img_size, img_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    for p_name, p in model.named_parameters():
        assert p.grad is not None, p_name
        assert torch.isfinite(p.grad).all(), p_name
        assert p.grad.abs().sum() > 0, p_name


@pytest.mark.parametrize("name", list_models())
def test_every_model_records_its_natural_size_and_no_decay_names(name):
    model = create_model(name)
    assert isinstance(model.default_img_size, int) and model.default_img_size >= 1
    names = dict(model.named_parameters())
    for n in getattr(model, "no_weight_decay", set)():
        assert n in names and names[n].ndim > 1  # ndim <= 1 ones are skipped by the optimiser anyway


def test_vits_exclude_cls_token_and_pos_embed_from_weight_decay():
    assert create_model("vit_tiny_6l8h").no_weight_decay() == {"cls_token", "pos_embed"}
    assert create_model("notebook_vit").no_weight_decay() == {"cls_token", "pos_embed"}


def test_unknown_model_lists_closest_names():
    with pytest.raises(UserError, match="convmixer_256_12"):
        create_model("convmixer_256_21")


def test_unknown_override_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="resnet18.*foo"):
        create_model("resnet18", foo=1)


# --- the study's notebook models and exact counts ----------------------------------------------

@pytest.mark.parametrize("name,params", [
    ("notebook_convmixer", 961_814),
    ("notebook_vit", 811_146),
    ("notebook_resnet9", 1_647_242),
    ("resnet18", 11_181_642),
])
def test_exact_parameter_counts(name, params):
    assert count_params(create_model(name, num_classes=10)) == params


def test_resnet18_counts_like_torchvision_and_small_input_drops_the_maxpool():
    assert count_params(create_model("resnet18")) == count_params(torchvision.models.resnet18(num_classes=10))
    small = create_model("resnet18", small_input=True)
    assert small.default_img_size == 32
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())
    # 3x3 stem (1,728 weights) instead of 7x7 (9,408)
    assert count_params(small) == 11_181_642 - 9_408 + 1_728
    assert small.stem(torch.randn(1, 3, 32, 32)).shape == (1, 64, 32, 32)


def test_resnet18_width_scales_every_stage():
    model = create_model("resnet18", width=32)
    assert model.head.fc.in_features == 256
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_seed_resnet9_runs_at_160_with_the_same_parameters_and_matches_maxpool4_at_32():
    model = create_model("notebook_resnet9").eval()
    assert count_params(create_model("notebook_resnet9", img_size=160)) == 1_647_242
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 10)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        feats = model.blocks(model.stem(x))  # (2, 256, 4, 4)
        notebook = model.head.fc(F.max_pool2d(feats, 4).flatten(1))  # the notebook's MaxPool2d(4)
        assert torch.equal(model(x), notebook)


def test_seed_convmixer_quirks():
    model = create_model("notebook_convmixer")
    assert model.stem(torch.randn(1, 3, 32, 32)).shape == (1, 256, 31, 31)  # stride 1: no patching
    gains = [p for n, p in model.named_parameters() if n.endswith("gain")]
    assert len(gains) == 12 and all(g.shape == (1,) and g.item() == 0 for g in gains)
    assert model.head[2].p == 0.3


@pytest.mark.parametrize("name", ["notebook_convmixer", "notebook_vit", "notebook_resnet9"])
def test_seed_models_use_the_notebooks_kaiming_init(name):
    model = create_model(name)
    linears = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert linears and all(m.bias is None or not m.bias.any() for m in linears)
    big = max(linears, key=lambda m: m.weight.numel())
    fan_in = big.weight[0].numel()
    assert big.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)


def test_seed_vit_position_embedding_is_standard_normal():
    pos = create_model("notebook_vit").pos_embed
    assert pos.shape == (1, 65, 128)
    assert pos.std().item() == pytest.approx(1.0, rel=0.1)


# --- invalid combinations ---------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,match", [
    ("vit_tiny_6l8h", {"img_size": 150}, "multiple of patch_size=16"),
    ("vit_tiny_6l8h", {"img_size": 8}, "multiple of patch_size=16"),
    ("vit_tiny_6l8h", {"num_heads": 5}, "multiple of num_heads"),
    ("notebook_vit", {"img_size": 64}, "fixed at 32px"),
    ("convmixer_256_12", {"activation": "tanh"}, "activation"),
    ("convmixer_256_12", {"img_size": 5}, "img_size >= 7"),
    ("resnet9", {"img_size": 4}, "img_size >= 8"),
    ("notebook_resnet9", {"img_size": 0}, "img_size >= 8"),
    ("resnet18", {"img_size": -1}, "img_size >= 1"),
    ("resnet18", {"img_size": 0}, "img_size >= 1"),
    ("resnet18", {"width": 0}, "positive width"),
])
def test_invalid_combinations_are_user_errors_naming_the_model(name, overrides, match):
    """The constructors raise ValueError; create_model (the caller's values) turns it into a UserError."""
    with pytest.raises(UserError, match=match) as e:
        create_model(name, **overrides)
    assert str(e.value).startswith(f"model {name}: ")


@pytest.mark.parametrize("name,overrides,match", [
    ("resnet9", {"width": "x"}, "need a whole number"),
    ("resnet9", {"width": 2.5}, "need a whole number"),
    ("resnet9", {"widht": 3}, "takes no argument 'widht'"),
    ("convmixer_256_8", {"residual_gain": "maybe"}, "need true or false"),
    ("resnet18", {"layers": "2,x"}, "comma-separated list of whole numbers"),
    ("resnet18", {"layers": "2,2"}, "4 positive stage depths"),
    ("vit_tiny_6l8h", {"dropout": float("inf")}, "finite"),
])
def test_overrides_are_checked_against_the_signature(name, overrides, match):
    with pytest.raises(UserError, match=match):
        create_model(name, **overrides)


def test_text_overrides_are_typed_by_the_signature():
    from patchbench.models import check_overrides

    assert check_overrides("resnet18", {"layers": "1,1,1,1", "small_input": "true", "img_size": "none"}) == \
        {"layers": (1, 1, 1, 1), "small_input": True, "img_size": None}
    assert check_overrides("vit_tiny_6l8h", {"mlp_dim": "none", "dropout": "0.1"}) == {"mlp_dim": None, "dropout": 0.1}


@pytest.mark.parametrize("name,shape,match", [
    ("vit_tiny_6l8h", (1, 3, 64, 64), "create it with img_size=64"),
    ("vit_tiny_6l8h", (1, 3, 160, 144), "square"),
    ("notebook_vit", (1, 3, 64, 64), "built for 32x32"),
])
def test_vits_refuse_inputs_they_were_not_built_for(name, shape, match):
    with pytest.raises(ValueError, match=match):
        create_model(name)(torch.randn(shape))


def test_vit_built_for_another_size_runs_there():
    model = create_model("vit_tiny_6l8h", img_size=64)
    assert model.pos_embed.shape == (1, 17, 128)  # (64/16)^2 patches + cls
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --- params and MACs --------------------------------------------------------------------------

def test_count_macs_of_known_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # 8 * 3*3*3 MACs per output pixel
    assert count_macs(conv, 10) == 8 * 27 * 100
    lin = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 4 * 4, 5))
    assert count_macs(lin, 4) == 48 * 5
    assert count_params(lin) == 48 * 5 + 5


def test_vit_macs_count_attention():
    m = ViT(dim=32, depth=1, num_heads=4, mlp_dim=64, patch_size=4, img_size=16)
    n, d = 17, 32  # 16 patches + cls
    expected = 16 * 48 * d + n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 64 + d * 10
    assert count_macs(m, 16) == expected


@pytest.mark.parametrize("name", ["notebook_vit", "notebook_convmixer", "vit_tiny_6l8h", "resnet18"])
def test_macs_on_cpu_equal_macs_on_meta_and_mode_is_restored(name):
    cpu = create_model(name, img_size=32).train()
    with torch.device("meta"):
        meta = create_model(name, img_size=32)
    with torch.no_grad():  # the counter must still see nn.MultiheadAttention's work
        macs = count_macs(cpu, 32)
    assert macs == count_macs(meta, 32) > 0
    assert cpu.training


def test_resnet18_macs_at_224_match_the_published_figure():
    with torch.device("meta"):
        model = create_model("resnet18", num_classes=1000, img_size=224)
    assert count_macs(model, 224) / 1e9 == pytest.approx(1.82, abs=0.01)  # torchvision: 1.81 GFLOPS (MACs)


def test_residual_gain_keeps_the_branch_dtype_and_the_fp32_function():
    """The notebook's scalar gain: in fp32 exactly gain * branch; under bf16 autocast the trunk stays bf16
    (an fp32 gain used to promote it, costing casts in every later layer)."""
    from patchbench.models.layers import Residual

    torch.manual_seed(0)
    res = Residual(nn.Conv2d(8, 8, 3, padding=1), gain_init=0.0)
    nn.init.normal_(res.gain)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(res(x), x + res.gain * res.fn(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert res(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(create_model("notebook_convmixer")(torch.zeros(1, 3, 32, 32)).isfinite(), torch.ones(1, 10, dtype=bool))


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    """Under bf16 autocast on the CPU, q/k/v go to scaled_dot_product_attention in fp32 (torch's bf16 CPU
    attention is several times slower); the output returns in bf16 and stays close to the fp32 model's."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(q.dtype)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = create_model("vit_tiny_6l8h", num_classes=10, img_size=32, dim=64, depth=2, num_heads=4, mlp_dim=128,
                         patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert seen == [torch.float32] * 4  # fp32 model: 2 blocks; under autocast: 2 blocks, still fp32
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), full, atol=0.1, rtol=0.05)
