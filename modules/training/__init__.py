"""Training: the one loop every training script shares, and what it needs around it.

    loop.py              train() and the Trainer: the choices before training, then each step in order
                         (learning rate, micro-batches, forward, loss, backward, clip, update), evaluate, save
    schedule.py          what each step trains on and at which learning rate; the steps --max-time fits
    parallel.py          how the processes share the work, one object chosen once (one process here, DDP in
                         ddp.py); the start and end of every training script (training_run)
    task.py              TrainingTask: what a script trains (data, loss, metrics, samples, checkpoint entries)
    settings.py          TrainingSettings: the shared flags as one checked object
    starting_model.py    --init: random weights, OpenAI's GPT-2, or a checkpoint
    optimizer.py         AdamW with weight decay on matrices only
    resume.py            what --resume needs, saved in the last checkpoint
    interrupt.py         Ctrl-C: finish the step, save, stop
    reports.py           the metrics file and the loss plot beside the checkpoint
    memory_plan.py       the memory each process will need, printed before the first step
  imported only when asked for:
    ddp.py               several processes, each with the whole model (torchrun)
    fsdp.py              --parallel fsdp: FSDP2 per block and root, the whole model gathered for its checkpoint,
                         the resume state written by every process (torch.distributed.checkpoint)
    activation_checkpointing.py  --activation-checkpointing: each block recomputed in the backward pass

A script imports what it calls from the file that defines it (`from modules.training.loop import train`),
so that a run imports only what it runs.
"""
