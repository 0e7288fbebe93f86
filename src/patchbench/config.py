"""Configuration as data: dataclasses saved with every run, and the named presets.

A run is fully described by a `RunConfig` (model + data + train), which is written to
`RUN_DIR/config.json` and read back with `RunConfig.from_dict`, so a run directory alone
reproduces the run. Presets are `Preset`s: a recipe shared by several models, with per-model
overrides (the study used weight decay 0.3 for the ViT only, say) and a list of the quirks the
recipe reproduces on purpose.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from patchbench.errors import UserError

SCHEDULES = ("onecycle", "piecewise", "constant")
INITS = ("default", "kaiming")
AMPS = ("none", "bf16", "fp16")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # what the study's notebook normalised with
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class DataConfig:
    """Where the images come from and how a batch is made from them."""

    source: str = "imagenette-160"  # registered name, archive path (.tgz/.tar/.zip) or folder
    md5: str | None = None  # expected MD5 of a local archive (registered names carry their own)
    cache_dir: str | None = None  # None: the user's cache directory (~/.cache/patchbench)
    prepare_size: int = 160  # stored resolution: shorter side to this, then centre crop
    img_size: int = 160  # what the model sees (train crops and eval images are resized to this)
    # training augmentation: per-sample random-resized-crop (torchvision semantics) + flip
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    # evaluation: deterministic centre crop keeping this fraction of the side, resized to img_size
    eval_crop: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class ModelConfig:
    name: str = "convmixer_256_12"
    overrides: dict[str, Any] = field(default_factory=dict)  # keyword arguments for create_model


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # global batch (summed over DDP ranks)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05  # never applied to norms, biases, gains, cls token, pos embedding
    wd_conv_linear_only: bool = False  # the notebook's rule: decay only nn.Conv2d/nn.Linear weights
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "onecycle"  # onecycle (torch OneCycleLR shape) | piecewise (ConvMixer) | constant
    schedule_epochs: int | None = None  # None: span exactly this run (the study sized it for 100)
    pct_start: float = 0.3  # onecycle warm-up fraction
    cycle_momentum: bool = False  # onecycle: move Adam's beta1 0.95 -> 0.85 -> 0.95 (torch's default)
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm
    ema_decay: float | None = None  # e.g. 0.999; evaluated with the EMA weights when set
    init: str = "default"  # default | kaiming (kaiming-normal conv/linear weights, zero biases)
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    fast_kernels: bool = True  # CPU: patchbench.kernels.use_fast_kernels (same function, faster step)
    sync_bn: bool = False  # DDP only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    seed: int = 0
    deterministic: bool = False
    log_every: int = 20  # steps between progress-bar/TensorBoard updates


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None
    quirks: list[str] = field(default_factory=list)  # study flaws reproduced on purpose

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            data=_build(DataConfig, d.get("data", {}), "data"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            preset=d.get("preset"),
            quirks=list(d.get("quirks", [])),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> "RunConfig":
        """Raise UserError naming the first impossible value (and the flag that sets it)."""
        t, d = self.train, self.data
        checks = [
            (t.epochs >= 1, "--epochs", t.epochs, "a whole number >= 1"),
            (t.batch_size >= 1, "--batch-size", t.batch_size, "a whole number >= 1"),
            (t.lr > 0, "--lr", t.lr, "a positive number"),
            (t.weight_decay >= 0, "--weight-decay", t.weight_decay, "a number >= 0"),
            (all(0 <= b < 1 for b in t.betas), "betas", t.betas, "two numbers in [0, 1)"),
            (t.schedule in SCHEDULES, "--schedule", t.schedule, f"one of {', '.join(SCHEDULES)}"),
            (t.schedule_epochs is None or t.schedule_epochs >= t.epochs, "--schedule-epochs", t.schedule_epochs,
             "at least --epochs (the schedule must cover the run)"),
            (0 < t.pct_start < 1, "--pct-start", t.pct_start, "a fraction in (0, 1)"),
            (0 <= t.label_smoothing < 1, "--label-smoothing", t.label_smoothing, "a number in [0, 1)"),
            (t.grad_clip is None or t.grad_clip > 0, "--grad-clip", t.grad_clip, "a positive max norm"),
            (t.ema_decay is None or 0 < t.ema_decay < 1, "--ema", t.ema_decay, "a decay in (0, 1), e.g. 0.999"),
            (t.init in INITS, "--init", t.init, f"one of {', '.join(INITS)}"),
            (t.amp in AMPS, "--amp", t.amp, f"one of {', '.join(AMPS)}"),
            (t.seed >= 0, "--seed", t.seed, "a whole number >= 0"),
            (t.log_every >= 1, "--log-every", t.log_every, "a whole number >= 1"),
            (t.threads is None or t.threads >= 1, "--threads", t.threads, "a whole number >= 1"),
            (d.prepare_size >= 1, "--prepare-size", d.prepare_size, "a positive number of pixels"),
            (1 <= d.img_size <= d.prepare_size, "--img-size", d.img_size,
             f"between 1 and --prepare-size ({d.prepare_size}); raise --prepare-size to train larger"),
            (0 < d.scale[0] <= d.scale[1] <= 1, "--scale", d.scale, "MIN,MAX with 0 < MIN <= MAX <= 1"),
            (0 < d.ratio[0] <= d.ratio[1], "--ratio", d.ratio, "MIN,MAX with 0 < MIN <= MAX"),
            (0 < d.eval_crop <= 1, "--eval-crop", d.eval_crop, "a fraction of the side in (0, 1]"),
        ]
        for ok, flag, value, need in checks:
            if not ok:
                raise UserError(f"{flag} {value}: need {need}")
        if not (t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit())):
            raise UserError(f"--device {t.device!r}: use auto, cpu, cuda or cuda:N")
        return self


def _build(cls, values: dict[str, Any], section: str):
    """Build a dataclass from a dict, turning lists back into tuples; unknown keys are errors."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"unknown {section} config key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) and "tuple" in str(names[k].type) else v
              for k, v in values.items()}
    return cls(**kwargs)


def replace(cfg, **changes):
    """dataclasses.replace that names the dataclass in the error for an unknown field."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise UserError(f"unknown {type(cfg).__name__} field(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(cfg, **changes)


@dataclass
class Preset:
    """A named recipe: data + train settings shared by `models`, with per-model train overrides."""

    name: str
    description: str
    models: list[str]
    data: DataConfig
    train: TrainConfig
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> TrainConfig changes
    quirks: list[str] = field(default_factory=list)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> create_model kwargs

    def config_for(self, model: str, seed: int = 0, **model_overrides: Any) -> RunConfig:
        train = replace(self.train, seed=seed, **self.per_model.get(model, {}))
        return RunConfig(
            model=ModelConfig(name=model, overrides={**self.model_overrides.get(model, {}), **model_overrides}),
            data=dataclasses.replace(self.data),
            train=train,
            preset=self.name,
            quirks=list(self.quirks),
        )


SEED_QUIRKS = [
    "training at 32x32: RandomResizedCrop(32, scale=(0.8, 0.99), ratio=(1, 1)) of the 160px images",
    "normalisation with CIFAR-10 statistics, not Imagenette's",
    "OneCycleLR sized for 100 epochs but stopped after 30: the rate never anneals",
    "batch size 16, AdamW lr 1e-3, kaiming-normal init of every conv/linear weight",
    "seed_convmixer's patch embedding has stride 1 (not a real patch embedding)",
    "weight decay only on conv/linear weights (nn.MultiheadAttention's packed in_proj weight is not decayed)",
    "fixed here on purpose: evaluation is a deterministic centre crop and scores every val image",
    "deviation: crops are taken from the cached 160x160 centre square, not the full non-square image",
]

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="seed",
            description="The study's notebook exactly (32px crops, CIFAR stats, batch 16, "
            "OneCycleLR sized for 100 epochs, stopped at 30), flaws labelled; eval made deterministic.",
            models=["seed_convmixer", "seed_vit", "seed_resnet9"],
            data=DataConfig(
                prepare_size=160, img_size=32, scale=(0.8, 0.99), ratio=(1.0, 1.0), hflip=True,
                eval_crop=0.946, mean=CIFAR10_MEAN, std=CIFAR10_STD,  # sqrt(0.895): the crop's mean area
            ),
            train=TrainConfig(
                epochs=30, batch_size=16, lr=1e-3, weight_decay=0.0, wd_conv_linear_only=True,
                schedule="onecycle", schedule_epochs=100, cycle_momentum=True, init="kaiming",
            ),
            per_model={"seed_vit": {"weight_decay": 0.3}},
            quirks=SEED_QUIRKS,
        ),
        Preset(
            name="study160",
            description="The design the study's text states, flaws fixed: 160px, ConvMixer-256/12 "
            "k7 p7, ViT, ResNet-18; AdamW 1e-3, batch 16, weight decay for the ViT, 30 epochs, "
            "OneCycleLR spanning the run; deterministic evaluation of every image.",
            models=["convmixer_256_12", "vit_tiny_6l8h", "resnet18"],
            data=DataConfig(prepare_size=160, img_size=160, scale=(0.35, 1.0)),
            train=TrainConfig(
                epochs=30, batch_size=16, lr=1e-3, weight_decay=0.0, schedule="onecycle",
                cycle_momentum=True, amp="bf16", channels_last=True,
            ),
            per_model={"vit_tiny_6l8h": {"weight_decay": 0.3}},
        ),
        Preset(
            name="quick",
            description="A real but small study on a 2-core CPU: narrow versions of the three families "
            "(0.10-0.14M params, 6-11M MACs) at 32px (images cached at 40px), 5 epochs; ~2 minutes per model.",
            models=["convmixer_256_8", "vit_tiny_6l8h", "resnet9"],
            data=DataConfig(prepare_size=40, img_size=32, scale=(0.35, 1.0), eval_crop=0.875),
            train=TrainConfig(
                epochs=5, batch_size=64, lr=3e-3, weight_decay=0.05, schedule="onecycle",
                label_smoothing=0.1, grad_clip=1.0,
                threads=1,  # on a shared 2-core CPU, 2 OpenMP threads per process ran 2-4x slower than 1
            ),
            per_model={"vit_tiny_6l8h": {"lr": 2e-3}},
            model_overrides={
                "convmixer_256_8": {"dim": 128, "depth": 6, "patch_size": 4, "kernel_size": 5},
                "vit_tiny_6l8h": {"dim": 64, "depth": 4, "num_heads": 4, "mlp_dim": 128, "patch_size": 4},
                "resnet9": {"width": 8},
            },
        ),
        Preset(
            name="smoke",
            description="Seconds on a tiny folder (about a minute on Imagenette on a CPU): tiny versions "
            "of the three families at 32px, one epoch. For tests and for checking a setup.",
            models=["convmixer_256_8", "vit_tiny_6l8h", "resnet9"],
            data=DataConfig(prepare_size=32, img_size=32, scale=(0.35, 1.0)),
            train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, weight_decay=0.05, log_every=1),
            model_overrides={
                "convmixer_256_8": {"dim": 32, "depth": 2, "patch_size": 4, "kernel_size": 3},
                "vit_tiny_6l8h": {"dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "patch_size": 8},
                "resnet9": {"width": 4},
            },
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_presets() -> list[str]:
    return list(PRESETS)
