"""Where the nano pipeline's runs and shipped models are by default (relative to the repository root)."""

RUNS = "runs/nano"
TEXT_ENCODER_RUN = f"{RUNS}/text-encoder"
TEXT_ENCODER = f"{TEXT_ENCODER_RUN}/text-encoder"  # the trained CLIPTextModel folder inside its run
VAE_RUN = f"{RUNS}/vae"
UNET_RUN = f"{RUNS}/unet"

MODELS = "models/nano"  # what the pack ships
SD15_FILE = "nano-sd15.safetensors"  # nano U-Net + TAESD VAE in ComfyUI's SD1.5 layout
SD15_CHECKPOINT = f"{MODELS}/{SD15_FILE}"
SHIPPED_TEXT_ENCODER = f"{MODELS}/text-encoder"
KOSMOSG_CHECKPOINT = f"{MODELS}/kosmosg-nano.safetensors"
