"""`jetspec-trt train`: distil a JetSpec draft head from a frozen target on the target's own responses."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.option("--target", "target_dir", required=True, type=click.Path(path_type=Path), help="Target HF directory.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Head directory (also holds data/ and checkpoints/).")
@click.option("--data", "source", default="sharegpt", show_default=True,
              help="Prompt suite (sharegpt, mtbench, math500, aime, humaneval) or a .jsonl of "
                   '{"messages": [...]} / {"prompt": "..."} lines.')
@click.option("--num-prompts", type=int, default=1000, show_default=True)
@click.option("--prompt-offset", type=int, default=0, show_default=True,
              help="Skip the data's first N prompts (after mixing), e.g. the ones earlier runs of --init-head answered.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Response length cap.")
@click.option("--gen-temperature", type=float, default=0.0, show_default=True,
              help="Sampling temperature of the regenerated responses (0 = greedy).")
@click.option("--gen-batch-size", type=int, default=32, show_default=True, help="Rows the batched generator decodes together.")
@click.option("--gen-prefill-tokens", type=int, default=16384, show_default=True,
              help="Prompt tokens per packed prefill forward of the batched generator.")
@click.option("--gen-attention", type=click.Choice(["auto", "triton", "sdpa"]), default="auto", show_default=True,
              help="The batched generator's decode attention (auto: the Triton kernel on CUDA).")
@click.option("--max-seq-len", type=int, default=2048, show_default=True, help="Prompt + response tokens kept.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps (0 = make data only).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per step.")
@click.option("--lr", type=float, default=6e-4, show_default=True)
@click.option("--warmup-steps", type=int, default=None, help="[default: 4% of --steps]")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True, help="Draft block (max depth + 1).")
@click.option("--num-layers", type=int, default=1, show_default=True, help="Head decoder layers.")
@click.option("--intermediate-size", type=int, default=None,
              help="Head MLP width [default: the target's, or --init-head's; smaller narrows an --init-head].")
@click.option("--num-kv-heads", type=int, default=None,
              help="Head KV heads [default: the target's, or --init-head's; a multiple widens an --init-head].")
@click.option("--target-layer-ids", default="auto", show_default=True,
              help="Target layers whose hidden states feed the head: auto or e.g. 1,5,9.")
@click.option("--mask-token-id", type=int, default=None,
              help="[default: the tokenizer's mask token, else a reserved special such as <|vision_pad|>]")
@click.option("--loss", "loss_kind", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
              help="ce: cross-entropy to the target's own next token (its greedy response); kl: forward KL from "
                   "the target's distribution (2x the lm_head work, keeps the target's final hidden states).")
@click.option("--loss-gamma", type=float, default=7.0, show_default=True,
              help="Depth k's loss weight is exp(-(k-1)/gamma); 0 = uniform.")
@click.option("--loss-backend", type=click.Choice(["auto", "torch", "liger"]), default="auto", show_default=True,
              help="auto: liger-kernel's fused linear cross-entropy on CUDA when installed, else chunked torch.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Temperature of the target's distribution in the KL objective.")
@click.option("--anchors-per-seq", type=int, default=512, show_default=True,
              help="Draft blocks per sequence and step (512: every response position of most sequences).")
@click.option("--anchor-group", type=int, default=64, show_default=True,
              help="Anchors per attention row: a sequence's blocks are split into rows of this many (sharing its "
                   "context K/V), so each block attends context + group*block keys, not every block of the sequence.")
@click.option("--feature-store", type=click.Choice(["auto", "device", "host"]), default="auto", show_default=True,
              help="Where the target's stored features live: the GPU, pinned host memory (gathered per step), or "
                   "auto (the GPU while they take at most half its free memory).")
@click.option("--depth-sampling/--no-depth-sampling", default=True, show_default=True,
              help="Keep depth k's row with probability exp(-(k-1)/gamma) instead of weighting it: the same expected "
                   "loss at ~45% of the lm_head work (gamma 7, block 16).")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Held-out top-1 agreement per depth every N steps, into the card's curve (0: before/after only).")
@click.option("--heldout", type=int, default=32, show_default=True,
              help="Sequences kept out for the acceptance proxy.")
@click.option("--warm-start", is_flag=True, help="Copy the last target layers into the head where shapes agree.")
@click.option("--init-head", type=click.Path(path_type=Path), default=None,
              help="Continue training this trained head (its shape is the run's) instead of a random one.")
@click.option("--gen-time-budget", "gen_time_budget_s", type=float, default=None,
              help="Stop generating responses after this many seconds and train on those made so far "
                   "(the rest are generated by a later run with the same data flags); 0: generate nothing, train on the "
                   "responses an earlier run with the same data flags cached.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="Frozen target's dtype (auto: bfloat16 on cuda with autocast, float32 on cpu).")
@click.option("--save-every", type=int, default=200, show_default=True, help="Checkpoint interval (steps).")
@click.option("--max-time", "max_time_s", type=float, default=None,
              help="Stop with a checkpoint after this many seconds of training (continue with --resume).")
@click.option("--time-budget", "time_budget_s", type=float, default=None,
              help="Fit warmup + cosine schedule into this many seconds of training (--steps is then a cap).")
@click.option("--wall-budget", "wall_budget_s", type=float, default=None,
              help="End the whole command, setup included, within this many seconds (the training time budget "
                   "becomes what the setup leaves; at most --time-budget).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUTPUT/checkpoints.")
@click.option("--overwrite", is_flag=True, help="Discard an earlier run's checkpoints and start over.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--profile-steps", type=int, default=0, show_default=True,
              help="Trace N training steps (after 2 untraced warm-up steps; all of them train) under torch.profiler: "
                   "OUTPUT/profile_steps.json and a table in the log give step time, per-phase time, top kernels.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(target_dir, output_dir, source, num_prompts, prompt_offset, max_new_tokens, gen_temperature,
                  gen_batch_size, gen_prefill_tokens, gen_attention, max_seq_len, steps, batch_size, lr, warmup_steps,
                  weight_decay, grad_clip, block_size, num_layers, intermediate_size, num_kv_heads, target_layer_ids,
                  mask_token_id, loss_kind, loss_gamma, loss_backend, temperature, anchors_per_seq, anchor_group,
                  feature_store, depth_sampling, eval_every, heldout, warm_start, init_head, gen_time_budget_s, device,
                  dtype, save_every, max_time_s, time_budget_s, wall_budget_s, resume, overwrite, seed, profile_steps,
                  quiet):
    """Train a draft head for TARGET on the target's own responses; write it in the published layout."""
    from jetspec_trt.train.data import DataConfig
    from jetspec_trt.train.loss import LossConfig
    from jetspec_trt.train.trainer import TrainConfig, train

    data = DataConfig(source, num_prompts, max_new_tokens, gen_temperature, gen_batch_size, max_seq_len,
                      gen_time_budget_s, prompt_offset, gen_prefill_tokens, gen_attention)
    cfg = TrainConfig(
        target_dir, output_dir, data, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, block_size=block_size, num_layers=num_layers,
        intermediate_size=intermediate_size, num_kv_heads=num_kv_heads,
        target_layer_ids=target_layer_ids, mask_token_id=mask_token_id,
        loss=LossConfig(loss_kind, temperature, loss_gamma or None, backend=loss_backend),
        anchors_per_seq=anchors_per_seq, anchor_group=anchor_group, feature_store=feature_store,
        depth_sampling=depth_sampling,
        eval_every=eval_every, heldout=heldout, warm_start=warm_start, init_head=init_head,
        device=device, dtype=dtype, save_every=save_every, resume=resume, overwrite=overwrite, max_time_s=max_time_s,
        time_budget_s=time_budget_s, wall_budget_s=wall_budget_s, seed=seed, profile_steps=profile_steps,
        progress=not quiet,
    )
    result = train(cfg)
    if steps == 0:
        click.echo(f"data ready: {result.card['data']['sequences']} sequences in {result.card['data']['cache_file']}")
    elif not result.finished:
        click.echo(f"stopped at step {result.step} of {steps} (--max-time); continue with --resume", err=True)
    else:
        card = result.card
        before, after = card["acceptance_proxy"]["before"], card["acceptance_proxy"]["after"]
        click.echo(f"loss {card['loss']['first']:.4f} -> {card['loss']['final']:.4f}; held-out chain tau proxy "
                   f"{(before or {}).get('chain_tau_proxy', float('nan')):.3f} -> {after['chain_tau_proxy']:.3f}; "
                   f"depth-1 agreement {(before or {}).get('top1_agreement_per_depth', [float('nan')])[0]:.3f} -> "
                   f"{after['top1_agreement_per_depth'][0]:.3f}; held-out tau by budget "
                   f"{(before or {}).get('simulated_tau')} -> {after['simulated_tau']}",
                   err=True)
        click.echo(f"draft head written to {result.output_dir}")
