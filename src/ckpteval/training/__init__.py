"""The compact training loop behind `mode=train_eval`: AdamW, warmup + cosine, clipping, accumulation,
optional bf16 autocast, periodic held-out evaluation through the same `run_eval` as `mode=loss`, and DCP
checkpoints that resume bit-for-bit (model, optimizer, scheduler, RNG and data position are all saved)."""

from ckpteval.training.loop import TrainState, build_optimizer, build_scheduler, lr_at

__all__ = ["TrainState", "build_optimizer", "build_scheduler", "lr_at"]
