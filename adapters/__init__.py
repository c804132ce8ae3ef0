"""LoRA adapters: training, atomic save/load (safetensors), the on-disk registry. Never imports ``agent``."""
