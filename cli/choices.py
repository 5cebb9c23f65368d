"""The names of every choice the scripts offer, in one place and free of torch.

The scripts check their flags before the heavy imports (torch, transformers and diffusers take about
20 s to import on a small machine), so these names cannot come from the registries themselves.
Instead each registry asserts at import that its keys are exactly the names here.
"""

DEFAULT_MODEL = "./weights/sdxl-base-1.0"
DOWNLOAD_HINT = (
    "get the weights with: uv run hf download stabilityai/stable-diffusion-xl-base-1.0 "
    "--local-dir weights/sdxl-base-1.0"
)

PRECISIONS = ("bf16", "fp16", "fp32")  # sdxl/device.py: DTYPES
TARGET_MODES = ("attention", "attention_out", "all")  # sdxl/lora.py: TARGETS
ADAPTER_KINDS = ("lora", "dora", "loha", "lokr")  # sdxl/lora.py: ADAPTERS
LOGGERS = ("tensorboard", "wandb", "all")  # training/train_util.py: MetricsLog
LORA_FORMATS = ("native", "diffusers", "kohya")  # sdxl/lora_formats.py: WRITERS
SAMPLER_NAMES = ("euler", "ddim", "ddpm")  # sampling/samplers.py: SAMPLERS
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adafactor", "prodigy")  # training/optimizers.py
LOSS_TYPES = ("l2", "huber", "smooth_l1")  # training/loss.py: elementwise_loss
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # training/noise.py: timesteps
LR_SCHEDULERS = ("constant", "linear", "cosine")  # training/optimizers.py: lr_lambda
CUDA_GRAPH_MODES = ("auto", "off")  # sdxl/capture.py; auto: on CUDA, where the options allow
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile's
PREDICTION_TYPES = ("epsilon", "v_prediction")  # sdxl/diffusion.py

BLOCKS = 23  # kohya's SDXL blocks, as --block_dims counts them: sdxl/sgm_names.py block_index
# Tiles of the VAE, in pixels: above this an image is encoded or decoded in overlapping tiles
# (sdxl/vae.py). 512 keeps a 1024 px image's VAE activations to about a quarter.
VAE_TILE_SIZE = 512
