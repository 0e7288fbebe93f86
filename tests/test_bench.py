"""`patchbench bench`: FLOP counting, reference mapping, the interleaved measurement and its JSON/CLI output."""

import json
import time

import pytest
import torch
import torchvision

from patchbench import bench
from patchbench.bench import Settings, flops_per_image, reference_for, run_bench
from patchbench.cli import main
from patchbench.errors import UserError
from patchbench.flops import count_macs, count_params
from patchbench.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convmixer():
    return create_model("convmixer_256_8", dim=32, depth=2, img_size=16)


def test_train_flops_are_forward_plus_backward():
    forward = flops_per_image(tiny_convmixer, 16, "infer")
    train = flops_per_image(tiny_convmixer, 16, "train")
    assert forward == 2 * count_macs(tiny_convmixer(), 16)  # the same counter as `patchbench models`
    assert train == 3 * forward  # backward = input grads + weight grads = 2x forward


def test_flop_counter_overcounts_depthwise_backward():
    """Why train FLOPs are 3x forward, not counted: torch's counter ignores groups in conv backward.
    If this starts failing, torch fixed it and the backward could be counted directly."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    w = torch.randn(32, 1, 5, 5, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.conv2d(x, w, padding=2, groups=32).sum().backward()
    forward = 2 * 2 * 32 * 8 * 8 * 25
    assert counter.get_total_flops() > 10 * 3 * forward


@pytest.mark.parametrize("name, against, reference", [
    ("convmixer_256_8", "timm", "timm ConvMixer"),
    ("convmixer_256_12", "timm", "timm ConvMixer"),
    ("vit_tiny_6l8h", "timm", "timm VisionTransformer"),
    ("resnet18", "torchvision", "torchvision resnet18"),
])
def test_references_have_our_parameter_shapes(name, against, reference):
    with torch.device("meta"):
        ours = create_model(name)
        ref_name, build = reference_for(ours, against)
        ref = build()
    assert ref_name == reference
    assert sorted(p.shape for p in ref.parameters()) == sorted(p.shape for p in ours.parameters())


def test_vit_reference_computes_our_function():
    ours = create_model("vit_tiny_6l8h", img_size=32, patch_size=8).eval()
    _, build = reference_for(ours, "timm")
    ref = build().eval()
    # the only naming difference: timm's patch embedding conv is patch_embed.proj
    state = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, against", [("notebook_convmixer", "timm"), ("resnet9", "torchvision"),
                                           ("resnet18", "timm"), ("vit_tiny_6l8h", "torchvision")])
def test_unmapped_references_are_user_errors(name, against):
    with torch.device("meta"):
        model = create_model(name)
    with pytest.raises(UserError, match="--against"):
        reference_for(model, against)


def test_reference_is_screened_at_least_as_equipped_as_ours():
    plain = bench.reference_candidates(Settings("fp32"), torch.device("cpu"))
    assert {(s.dtype, s.channels_last) for s in plain} == {("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    assert not any(s.compile for s in plain)
    compiled = bench.reference_candidates(Settings("fp16", True, True), torch.device("cpu"))
    assert {s.dtype for s in compiled} == {"fp32", "bf16", "fp16"} and any(s.compile for s in compiled)


def test_matmul_ceiling_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """A 128^3 matmul is 2 * 128^3 FLOPs; with the clock stubbed, torch.mm's path taking 4 ms and oneDNN's
    2 ms, the ceiling is oneDNN's 2.1 GFLOP/s, not torch.mm's 1.05."""
    assert torch.allclose(torch._C._nn.mkldnn_linear(torch.eye(3).to_mkldnn(), (2 * torch.eye(3)).to_mkldnn(),
                                                     None).to_dense(), 2 * torch.eye(3))  # the call computes x @ w.T
    clock = iter([0.0, 0.004] * 3 + [0.0, 0.002] * 3)  # warm-up + 2 timed calls each, torch.mm first
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    flops = 2 * 128**3
    assert bench.matmul_ceiling(torch.device("cpu"), torch.float32, n=128, repeats=2) == pytest.approx(flops / 0.002 / 1e9)


def test_run_bench_against_timm_interleaves_and_reports():
    lines = []
    result = run_bench("convmixer_256_8", img_size=16, batch_size=4, settings=Settings("fp32", True),
                       against="timm", repeats=2, warmup=1, device="cpu", log=lines.append)
    ours, ref = result["results"]
    assert ours["label"] == "ours" and ref["label"] == "timm ConvMixer"
    assert ours["params"] == ref["params"] == count_params(create_model("convmixer_256_8", img_size=16))
    assert len(ours["step_times_s"]) == len(ref["step_times_s"]) == 2
    assert result["ratio"] == pytest.approx(ref["step_s"] / ours["step_s"])
    assert ours["images_per_s"] == pytest.approx(4 / ours["step_s"])
    assert ours["achieved_gflops"] == pytest.approx(result["flops_per_image"] * ours["images_per_s"] / 1e9)
    assert 0 < ours["fraction_of_ceiling"]
    assert set(result["matmul_ceiling_gflops"]) >= {"fp32", ref["settings"]["dtype"]}
    assert any("screening" in line for line in lines) and "best of" in ref["notes"][0]
    assert "25 layers swapped" in ours["notes"][0]  # 8 depthwise convs + (1 + 2 x 8) GELU -> BatchNorm pairs


def test_cli_writes_json_and_ends_with_the_ratio(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    code = main(["bench", "--model", "resnet18", "--img-size", "32", "--batch-size", "2", "--mode", "infer",
                 "--against", "torchvision", "--repeats", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("ratio=") and float(printed[-1][6:]) > 0
    data = json.loads(out.read_text())
    assert data["mode"] == "infer" and data["command"].startswith("patchbench bench --model resnet18")
    assert [r["model"] for r in data["results"]] == ["resnet18", "torchvision resnet18"]
    assert list(out.parent.iterdir()) == [out]  # written atomically, no temporary left behind


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "nope"], "unknown model"),
    (["--against", "torchvision"], "--against torchvision"),
    (["--threads", "0"], "--threads"),
])
def test_cli_bad_input_exits_2(argv, message, capsys, tmp_path):
    args = ["bench", "--model", "convmixer_256_8", "--img-size", "16", "--out", str(tmp_path / "b.json")]
    code = main(args + argv)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_torchvision_reference_runs_at_the_same_shapes():
    ours = create_model("resnet18")
    _, build = reference_for(ours, "torchvision")
    assert isinstance(build(), torchvision.models.ResNet)


def test_reference_screen_drops_a_setting_whose_first_step_is_over_the_cap(monkeypatch):
    """Injected step times: the bf16 settings take 10x and 20x the fp32 ones' first step and are dropped
    after that one step; the fp32 ones go on."""
    cost = {Settings("fp32"): 0.01, Settings("fp32", True): 0.012, Settings("bf16"): 0.1, Settings("bf16", True): 0.2}
    calls = []

    def fake_step(model, settings, **kw):
        def step():
            calls.append(settings)
            time.sleep(cost[settings])
        return step

    monkeypatch.setattr(bench, "make_step", fake_step)
    lines = []
    steps, dropped = bench.screen(lambda: None, list(cost), warmup=3, cap=3.0,
                                  step_args={"device": torch.device("cpu")}, log=lines.append)
    assert set(steps) == {Settings("fp32"), Settings("fp32", True)}
    assert [line.split("]")[0] for line in dropped] == ["[bf16", "[bf16 channels_last"]
    assert calls.count(Settings("bf16")) == 1 and calls.count(Settings("fp32")) == 3  # dropped after one step
    assert all(line.startswith("  dropped [bf16") for line in lines)


def test_reference_candidates_start_with_ours():
    assert bench.reference_candidates(Settings("bf16", True), torch.device("cpu"))[0] == Settings("bf16", True)
