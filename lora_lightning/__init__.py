"""lora-lightning: LoRA fine-tuning for PyTorch Lightning as a drop-in callback."""

__version__ = "0.1.0"
