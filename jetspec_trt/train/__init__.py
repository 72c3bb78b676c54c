"""Training JetSpec draft heads against a frozen target (`jetspec-trt train`).

data.py       prompts -> the target's own responses (batched generation), cached as token ids
head.py       a fresh head for a target: config, layer ids, mask token, initial weights
objective.py  the many-blocks-per-sequence training forward and the forward-KL loss
trainer.py    the loop: AdamW, warmup + cosine, clipping, bf16 autocast, resumable checkpoints, training card
command.py    the click command
"""
