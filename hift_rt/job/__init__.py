"""The fine-tuning job behind `python -m hift_rt finetune` (the `hift-rt finetune` command).

With no options it trains a small Llama-shaped model from random weights on a corpus that ships
with Python (`pydoc_data.topics`, ~465 KB of English) through a byte-level tokenizer, on CUDA
when there is a GPU and otherwise on the CPU. `--model` takes a local Hugging Face model
directory, `--data` a .txt file or a UTF-8 .jsonl file with a "text" field. `--efficient-loss`
(auto: for vocabularies of EFFICIENT_LOSS_MIN_VOCAB tokens or more) computes the loss through
hift_rt.efficient_lm_loss, without the full logits. `--state-dtype` and `--master` choose how the
optimizer stores its moments and the master weights (hift_rt.wrap's state_dtype and
master_weights).

Every option and output path is checked before the first step; bad input ends the job with one
line (JobError). Ctrl-C stops at the next step boundary and, with --save, writes a checkpoint
there (a second Ctrl-C quits at once without saving); `--resume` continues it to the same
numbers as a run that was never interrupted. Checkpoints are written atomically by
hift_rt.checkpoint and hold the model (save_pretrained), the tokenizer when it is a Hugging Face
one, and STATE_FILE: optimizer, GradScaler, schedule, sampler position, per-step history and the
run's options. `--save DIR` takes a new or empty directory, or a checkpoint, and never one that
holds the --data file, the --model or the --resume directory; a write error (a full disk) ends
the job with one line and leaves DIR as it was; a damaged or edited checkpoint is refused with a
line that names the field.

Under `torchrun --nproc_per_node R` (WORLD_SIZE > 1) the job joins torch.distributed (NCCL with
each rank on cuda:LOCAL_RANK, gloo on the CPU) and hift_rt.wrap runs data parallel over it
(`--compare full`: torch AdamW under DistributedDataParallel). Every rank draws the same
batch_size x R windows per micro-batch from one seeded generator and trains on its batch_size of
them, so R ranks with --batch-size B follow one process with --batch-size R*B up to rounding (the
ranks' mean gradient and mean loss are sums in another order); the logged loss is the mean over
ranks. Rank 0 alone prints, shows the progress bar and writes the checkpoint, plot and JSON; every
rank takes part in the optimizer's state_dict() (a collective) before rank 0 saves. A JobError on
any rank ends every rank with exit code 2 and one line from rank 0 (Ranks.agree). torchrun
forwards Ctrl-C (SIGINT) to every rank once: the ranks agree at each step boundary whether one was
asked to stop, so all stop after the same step and save it. A checkpoint resumes on any number of
ranks, each reading it; --batch-size stays per rank.

Owns: the job's public names for hift_rt.cli. May call: its own modules: train.py (the training
loop), options.py (options and their checks), data.py (model, tokenizer, text, sampler),
state.py (what a checkpoint holds, writing and reading it), ranks.py (torchrun), report.py
(table, plot, JSON), errors.py (JobError).
"""
from .errors import JobError
from .options import add_arguments
from .ranks import launched_rank
from .state import STATE_FILE
from .train import main

__all__ = ["main", "add_arguments", "JobError", "launched_rank", "STATE_FILE"]
