"""celora-dist: CE-LoRA fine-tuning (approximate activation gradients for LoRA) at scale.

    from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step
    model = inject_celora(model, CELoRAConfig())
    ...; loss.backward(); optimizer.step(); on_optimizer_step(model)

    # Hugging Face Trainer / TRL SFTTrainer:
    model, callback = for_trainer(model, CELoRAConfig())   # a PeftModel + a TrainerCallback

    enable_chunked_loss(model, 1024)   # training loss without the (tokens x vocab) logits
"""
from .adapters import load_adapter, merge_celora, save_adapter
from .chunked_forward import disable_chunked_loss, enable_chunked_loss
from .config import CELoRAConfig
from .inject import inject_celora
from .layer import CELoRALinear
from .presets import preset
from .schedule import celora_state_dict, load_celora_state_dict, on_optimizer_step, telemetry

__all__ = [
    "CELoRAConfig",
    "CELoRALinear",
    "inject_celora",
    "on_optimizer_step",
    "telemetry",
    "save_adapter",
    "load_adapter",
    "merge_celora",
    "celora_state_dict",
    "load_celora_state_dict",
    "for_trainer",
    "preset",
    "enable_chunked_loss",
    "disable_chunked_loss",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # for_trainer pulls in transformers' Trainer machinery: imported on first use only.
    if name == "for_trainer":
        from .integrations.hf_trainer import for_trainer

        return for_trainer
    raise AttributeError(f"module 'celora_dist' has no attribute {name!r}")
