"""loraens: an ensemble of LoRA members on one frozen base model, with calibrated answers."""

__version__ = "0.1.0"
