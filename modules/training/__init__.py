"""Training: the one loop every training script shares, and what it needs around it.

    loop.py              train() and the Trainer: the choices before training, then each step in order
                         (learning rate, micro-batches, forward, loss, backward, clip, update), evaluate, save
    plan.py              what each step trains on and at which learning rate; the steps --max-time fits
    task.py              TrainingTask: what a script trains (data, loss, metrics, samples, checkpoint entries)
    settings.py          TrainingSettings: the shared flags as one checked object
    starting_weights.py  --init: random weights, OpenAI's GPT-2, or a checkpoint
    startup.py           the start and end of every training script
    distributed.py       several processes under torchrun
    optimizer.py         AdamW with weight decay on matrices only
    resume.py            what --resume needs, saved in the last checkpoint
    interrupt.py         Ctrl-C: finish the step, save, stop
    reports.py           the metrics file and the loss plot beside the checkpoint
  models larger than one device:
    sharding.py          --parallel fsdp: FSDP2 per block and root; the whole model gathered for its checkpoint
    sharded_state.py     the resume state of a sharded run, written by every process (torch.distributed.checkpoint)
    activation_checkpointing.py  --activation-checkpointing: each block recomputed in the backward pass
    memory_plan.py       the memory each process will need, printed before the first step
"""
from .loop import train
from .settings import TrainingSettings, add_training_args
from .starting_weights import add_init_args, initial_model
from .startup import parameter_summary, starting_model, training_run
from .task import TrainingTask

__all__ = ["TrainingSettings", "TrainingTask", "add_init_args", "add_training_args", "initial_model",
           "parameter_summary", "starting_model", "train", "training_run"]
