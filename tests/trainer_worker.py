"""One rank of HiFTTrainer under torchrun (tests/test_transformers_trainer.py):
`python -m torch.distributed.run --nproc_per_node R --standalone trainer_worker.py OUT MODE PER_DEVICE`.
MODE "train" runs 6 steps and saves checkpoints at 3 and 6; "resume" resumes from OUT/train/checkpoint-3.
Rank 0 writes the final weights to OUT/MODE.pt and the group steps to OUT/MODE.json."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hift_rt.integrations.transformers import HiFTTrainer  # noqa: E402
from models import tiny_llama  # noqa: E402
from test_transformers_trainer import Tokens, training_args  # noqa: E402

HIFT_ARGS = {"strategy": "random", "units_per_group": 1, "offload": True, "eps": 1e-3}


def run(out, mode, per_device, resume=None):
    torch.set_num_threads(1)
    model, _ = tiny_llama()
    args = training_args(os.path.join(out, mode), max_steps=6, save_steps=3, per_device_train_batch_size=per_device,
                         gradient_accumulation_steps=1, max_grad_norm=0.5, train_sampling_strategy="sequential")
    trainer = HiFTTrainer(model=model, args=args, train_dataset=Tokens(), hift_args=HIFT_ARGS)
    trainer.train(resume_from_checkpoint=resume)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    if trainer.args.process_index == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out, f"{mode}.pt"))
        with open(os.path.join(out, f"{mode}.json"), "w") as f:
            json.dump({"group_steps": opt.group_steps, "world": trainer.args.world_size,
                       "communication": opt.communication_stats(),
                       "ddp": type(trainer.model_wrapped).__name__}, f)


if __name__ == "__main__":
    out, mode, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run(out, mode, per_device, os.path.join(out, "train", "checkpoint-3") if mode == "resume" else None)
