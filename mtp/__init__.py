"""mtp: multitask pruning of pretrained encoders, on DeepSpeed."""

__version__ = "0.1.0"
