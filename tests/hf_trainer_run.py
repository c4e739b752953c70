"""A Trainer / TRL SFTTrainer run on the tiny test model, as a real process (one, or several
under ``accelerate launch``); the tests in test_hf_trainer.py read what it records.

    python tests/hf_trainer_run.py --assets DIR --out DIR [--trainer sft|plain] [--no-callback] ...

Records in OUT/record-rank<R>.json: per optimizer step whether it was a refresh step (exact
backward) and whether kept indices were in use, the losses, the final schedule state
(steps and indices per layer) and the telemetry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--assets", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trainer", choices=["sft", "plain"], default="sft")
    p.add_argument("--no-callback", action="store_true")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--refresh", type=int, default=3)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--deepspeed", default=None, help="HF-style DeepSpeed JSON (the accelerate plugin's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): CPU autocast")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="torch_compile=True with this torch_compile_backend (use_cpu=True)")
    return p.parse_args()


def chat_rows(n: int) -> list[dict]:
    from tests.train_utils import alpaca_rows

    return [{"messages": [{"role": "user", "content": f"{r['instruction']} : {r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in alpaca_rows(n)]


def main() -> None:
    args = parse()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    import celora_dist
    from celora_dist import CELoRAConfig
    from celora_dist.layer import celora_layers

    out = Path(args.out)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(Path(args.assets) / "tiny-llama")
    tok.chat_template = CHAT_TEMPLATE
    common = dict(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.micro,
                  gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=1,
                  save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
                  report_to=[], seed=0, data_seed=0,
                  ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None, lr_scheduler_type="constant",
                  disable_tqdm=True, deepspeed=args.deepspeed, bf16=args.bf16)
    if args.bf16:
        common["use_cpu"] = True
    if args.compile:
        common.update(torch_compile=True, torch_compile_backend=args.compile, use_cpu=True)
    # The order TRL's docs use: training arguments first, then the model. Under the accelerate
    # DeepSpeed plugin with ZeRO-3 that loads the model already partitioned (zero.Init).
    if args.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        targs = SFTConfig(**common, max_length=48, packing=args.packing)
    else:
        targs = TrainingArguments(**common)
    model = AutoModelForCausalLM.from_pretrained(Path(args.assets) / "tiny-llama")
    partitioned_at_load = any(hasattr(p, "ds_id") for p in model.parameters())
    cfg = CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=args.refresh)
    model, callback = celora_dist.for_trainer(model, cfg, verbose=False)
    layers = dict(celora_layers(model))
    steps: list[dict] = []

    class Recorder(TrainerCallback):
        """Before the CE-LoRA callback advances the schedule: what this step's backwards did."""

        def on_pre_optimizer_step(self, a, state, control, **kw):
            layer = list(layers.values())[-1]  # the last block: its input always needs a gradient
            steps.append({"global_step": state.global_step, "refresh": layer.refresh_due(),
                          "approximate": layer.selected is not None and not layer.refresh_due(),
                          "layer_step": layer.step})

    output_dtypes = set()  # what the CE-LoRA layers computed in during training (autocast: bf16)
    list(layers.values())[-1].register_forward_hook(
        lambda module, inputs, output: output_dtypes.add(str(output.dtype)) if module.training else None)
    callbacks = [Recorder()] + ([] if args.no_callback else [callback])
    if args.trainer == "sft":
        data = Dataset.from_list(chat_rows(64))
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=tok, callbacks=callbacks)
    else:
        enc = [tok(f"{r['messages'][0]['content']} {r['messages'][1]['content']}")["input_ids"] for r in chat_rows(64)]
        width = max(map(len, enc))
        ids = [e + [tok.pad_token_id] * (width - len(e)) for e in enc]
        labels = [e + [-100] * (width - len(e)) for e in enc]
        data = Dataset.from_dict({"input_ids": ids, "labels": labels,
                                  "attention_mask": [[1] * len(e) + [0] * (width - len(e)) for e in enc]})
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(str(out / "final"))

    rank = int(os.environ.get("RANK", 0))
    probe = tok(chat_rows(2)[1]["messages"][0]["content"], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # every rank: ZeRO-3 gathers are collective
        logits = trainer.model.eval()(input_ids=probe).logits
    if rank == 0:
        torch.save({"input_ids": probe, "logits": logits}, out / "probe.pt")
    state = celora_dist.celora_state_dict(model)
    record = {
        "steps": steps,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "schedule": {name: {"step": s["step"], "selected": None if s["selected"] is None else s["selected"].tolist()}
                     for name, s in state.items()},
        "telemetry": celora_dist.telemetry(model),
        "global_step": trainer.state.global_step,
        "partitioned_at_load": partitioned_at_load,
        "train_output_dtypes": sorted(output_dtypes),
        # what the Trainer compiled: its wrapper and the graphs Dynamo built (0 when eager)
        "compiled_wrapper": type(trainer.model_wrapped).__name__,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }
    (out / f"record-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
