"""What a training run is, as a few small frozen records: the library's whole interface to options.

train_sdxl.py turns its flags into these once (cli/train.py: `training_specs`); tests and benches
build them directly. Nothing in sdxl/, training/ or sampling/ reads the command line. Plain values
only, and no torch: the command line builds them before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SubsetSpec:
    """One folder of a dataset, as kohya's dataset config writes it ([[datasets.subsets]]): its
    images (directly in `image_dir`), captions and how its samples are drawn."""

    image_dir: Path
    metadata_file: Path | None = None  # kohya's fine-tuning subsets: captions from a JSON file
    num_repeats: int = 1
    is_reg: bool = False  # regularisation images (DreamBooth's prior preservation)
    class_tokens: str | None = None  # the caption of an image without a caption file
    caption_extension: str = ".txt"
    caption_prefix: str = ""
    caption_suffix: str = ""
    center_crop: bool = False  # kohya's random_crop = false
    random_flip: bool = False  # kohya's flip_aug
    caption_dropout: float = 0.0  # kohya's caption_dropout_rate
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_tag_dropout_rate: float = 0.0


@dataclass(frozen=True)
class DatasetSpec:
    """One of kohya's [[datasets]]: subsets that share a size, buckets and batch size. Every
    batch comes from one dataset; a run interleaves its datasets' batches."""

    subsets: tuple[SubsetSpec, ...]
    size: tuple[int, int] = (1024, 1024)  # (width, height)
    bucket: bool = False
    batch_size: int = 1  # per process
    validation_split: float = 0.0


@dataclass(frozen=True)
class DataSpec:
    """What the run trains on, and how each sample is drawn from it: a folder (`data_dir`), or
    the datasets of a kohya dataset config (`datasets`, which then replace the folder options)."""

    data_dir: Path
    reg_data_dir: Path | None = None  # regularisation images (DreamBooth's prior preservation)
    size: tuple[int, int] = (1024, 1024)  # (width, height) of the crops; buckets keep its area
    bucket: bool = False  # aspect-ratio buckets instead of crops of `size`
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0  # the empty prompt, for classifier-free guidance
    caption_extension: str = ".txt"
    shuffle_caption: bool = False  # kohya's caption options: tags split at caption_separator
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_tag_dropout_rate: float = 0.0
    masked_loss: bool = False  # weight the loss by each image's alpha or name.mask.png
    validation_split: float = 0.0
    max_token_length: int = 75  # 75, 150 or 225: caption chunks of 75 tokens
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    cache_dir: Path | None = None  # None: the project's cache folder (sdxl/files.py: cache_root)
    num_workers: int = 0
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    seed: int = 0  # data order, crops, flips, and each sample's noise and timestep
    datasets: tuple[DatasetSpec, ...] = ()  # --dataset_config

    @property
    def regularised(self) -> bool:
        """Whether the run has regularisation images."""
        subsets = (s for d in self.datasets for s in d.subsets)
        return self.reg_data_dir is not None or any(s.is_reg for s in subsets)


@dataclass(frozen=True)
class ModelSpec:
    """The base model, and what the run overrides of its configuration."""

    pretrained_model: str
    vae: Path | None = None
    vae_tile_size: int = 512  # encode and decode larger images in tiles (0: never)
    prediction_type: str | None = None  # None: the model's scheduler config
    zero_terminal_snr: bool | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """The adapters a LoRA run trains (a run without one fine-tunes the whole UNet)."""

    kind: str = "lora"  # cli/choices.py: ADAPTER_KINDS
    rank: int = 8
    alpha: float = 32.0
    target_mode: str = "attention"
    dropout: float = 0.0
    conv_rank: int = 0  # kohya's conv_dim: the ResNet blocks' 3x3 convolutions too
    conv_alpha: float | None = None  # default: conv_rank
    block_dims: tuple[int, ...] | None = None  # kohya's 23 per-block ranks
    block_alphas: tuple[float, ...] | None = None
    train_text_encoder: bool = False
    lokr_factor: int = -1  # LoKr's split of each side of a weight (-1: the most even)


@dataclass(frozen=True)
class LossSpec:
    """The training loss (training/loss.py): its kind, weights and noise."""

    loss_type: str = "l2"  # cli/choices.py: LOSS_TYPES
    huber_c: float = 0.1
    snr_gamma: float | None = None  # min-SNR weighting; None: off
    debiased: bool = False  # 1 / sqrt(SNR) weighting
    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # input perturbation
    prior_loss_weight: float = 1.0  # of the regularisation images' loss
    min_timestep: int = 0  # timesteps drawn from min_timestep .. max_timestep - 1 (kohya's)
    max_timestep: int | None = None  # None: the schedule's (1000)
    timestep_sampling: str = "uniform"  # cli/choices.py: TIMESTEP_SAMPLINGS
    logit_mean: float = 0.0  # of logit-normal sampling
    logit_std: float = 1.0


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer, its learning-rate schedule, clipping and EMA."""

    name: str = "adamw"  # cli/choices.py: OPTIMIZER_NAMES
    learning_rate: float = 1e-4
    text_encoder_lr: tuple[float, ...] | None = None  # one for both encoders, or CLIP-L's, bigG's
    eps: float = 1e-8
    weight_decay: float = 1e-2
    extra: dict[str, Any] = field(default_factory=dict)  # --optimizer_args, over the above
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float | None = None  # None: no EMA
    fused_backward_pass: bool = False  # each parameter stepped in the backward pass


@dataclass(frozen=True)
class StepSpec:
    """How the step runs on the device."""

    precision: str = "auto"  # bf16 on CUDA, fp32 on the CPU
    gradient_checkpointing: bool = True
    checkpoint_interval: int = 1  # recompute every N-th UNet block (1: all, the least memory)
    fp8_base: bool = False  # the frozen UNet stored in fp8 (LoRA only)
    # auto: CUDA graphs where the options allow; off: eager steps; uncaptured: the graphs' path
    # (fixed buffers, kept gradients) without capturing, which is what a CPU can test.
    cuda_graph: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    seed: int = 0
    full_bf16: bool = False  # full fine-tuning: bf16 weights, updates stochastically rounded
    fsdp: bool = False  # full fine-tuning: weights, gradients and optimizer state sharded (FSDP2)


@dataclass(frozen=True)
class TrainSpecs:
    data: DataSpec
    model: ModelSpec
    adapter: AdapterSpec | None  # None: full fine-tuning
    loss: LossSpec
    optimizer: OptimizerSpec
    step: StepSpec
