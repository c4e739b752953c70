"""Glue to trainers people already use. ``hf_trainer``: Hugging Face ``Trainer`` / TRL ``SFTTrainer``."""
