"""Quality of a quantized target against its unquantized reference, teacher-forced on held-out text.

Both targets read the same token sequences (prefill, logits at every position). Per position the bench records
whether the two models' top-1 next tokens agree, and each model's negative log-likelihood of the actual next
token; it reports the top-1 agreement, both perplexities (exp of the mean NLL over all predicted tokens) and the
mean KL(reference || quantized) of the next-token distributions. Writes
bench/results/quantize-compare-<device>[-tag].json.

The models are given as engine directories (their target/) or target checkpoints. On CUDA an FP8 target runs as
the engine runs it (FP8 GEMMs, q/k/v and gate/up fused); on the CPU it runs the reference (models/fp8.py): the
same e4m3 weights and scales, each projection's input rounded to e4m3 with the checkpoint's input_scale or per
token as the FP8 GEMMs do, float32 matmuls. The CPU therefore measures both roundings, weights' and activations';
only the GEMMs' accumulation differs from the GPU's.

Held-out text: chat prompts from a prompt source (suites, comma-separated, or a .jsonl of {"messages"} /
{"prompt"} lines, as datasets.load_prompt_messages reads), chat-templated as the engine sees them, or a plain .txt
file cut into windows of max_tokens tokens. The default suites differ from the calibration's (ShareGPT).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jetspec_trt.dtypes import parse_dtype
from jetspec_trt.errors import JetSpecError
from jetspec_trt.versions import library_versions


@dataclass(frozen=True)
class QuantizeCompareConfig:
    quantized: Path  # engine directory or target checkpoint (e.g. an FP8 engine)
    reference: Path  # the same target unquantized (engine directory or checkpoint)
    texts: str = "mtbench,math500,humaneval"  # prompt source(s), or a .txt file
    num_texts: int = 48
    max_tokens: int = 1024  # per text (a .txt file: the window length)
    device: str = "cuda"
    dtype: str = "bfloat16"  # non-FP8 tensors (and activations); float32 on the CPU is the usual choice there
    output_dir: Path = Path("bench/results")
    tag: str = ""


def target_dir_of(path: Path) -> Path:
    """An engine directory's target/, or the checkpoint directory itself."""
    path = Path(path)
    if (path / "manifest.json").is_file() and (path / "target").is_dir():
        return path / "target"
    if (path / "config.json").is_file():
        return path
    raise JetSpecError(f"{path} is neither an engine directory nor a checkpoint (no config.json)")


def held_out_sequences(tokenizer, cfg: QuantizeCompareConfig) -> list[list[int]]:
    if cfg.texts.endswith(".txt"):
        path = Path(cfg.texts)
        if not path.is_file():
            raise JetSpecError(f"text file {path} does not exist")
        ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        windows = [ids[i : i + cfg.max_tokens] for i in range(0, len(ids), cfg.max_tokens)]
        sequences = windows[: cfg.num_texts]
    else:
        from jetspec_trt.datasets import encode_prompts, load_prompt_messages

        sequences = [s[: cfg.max_tokens] for s in encode_prompts(tokenizer, load_prompt_messages(cfg.texts,
                                                                                                  cfg.num_texts))]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise JetSpecError(f"no held-out text of 2 or more tokens in {cfg.texts!r}")
    return sequences


@torch.no_grad()
def compare_logits(reference: torch.Tensor, quantized: torch.Tensor, ids: list[int]) -> dict:
    """Sums over the predicted positions of one sequence: logits [n, vocab] of both models at the n tokens of
    `ids`; position i predicts ids[i + 1]."""
    ref, q = reference[:-1].float(), quantized[:-1].float()
    nxt = torch.tensor(ids[1:], device=ref.device)
    ref_logp, q_logp = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
    return {
        "tokens": len(ids) - 1,
        "agree": int((ref.argmax(-1) == q.argmax(-1)).sum()),
        "reference_nll": float(-ref_logp.gather(1, nxt[:, None]).sum()),
        "quantized_nll": float(-q_logp.gather(1, nxt[:, None]).sum()),
        "kl": float((ref_logp.exp() * (ref_logp - q_logp)).sum()),
    }


def run_quantize_compare(cfg: QuantizeCompareConfig, command: list[str] | None = None) -> Path:
    from transformers import AutoTokenizer

    from jetspec_trt.models.checkpoint import load_target
    from jetspec_trt.models.fp8 import read_fp8_format

    dtype = parse_dtype(cfg.dtype)
    quantized_dir, reference_dir = target_dir_of(cfg.quantized), target_dir_of(cfg.reference)
    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir), local_files_only=True)
    sequences = held_out_sequences(tokenizer, cfg)
    cuda = torch.device(cfg.device).type == "cuda"
    totals = {"tokens": 0, "agree": 0, "reference_nll": 0.0, "quantized_nll": 0.0, "kl": 0.0}
    per_text = []
    # Both models on the device at once (an 8B pair: 16 GB bf16 + 8 GB FP8): one text's logits at a time, as
    # keeping every text's [n, vocab] logits would take tens of GB.
    reference = load_target(reference_dir, dtype, cfg.device, fused_gemm=cuda)
    quantized = load_target(quantized_dir, dtype, cfg.device, fused_gemm=cuda)
    for ids in sequences:
        row = compare_logits(reference.prefill(ids).logits, quantized.prefill(ids).logits, ids)
        per_text.append(row)
        for key in totals:
            totals[key] += row[key]
    n = totals["tokens"]
    fmt = read_fp8_format(quantized_dir)
    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or [],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "device": torch.cuda.get_device_name(torch.device(cfg.device)) if cuda else "cpu",
        "versions": library_versions("jetspec_trt", "torch", "transformers", "python"),
        "quantization": fmt.describe() if fmt else None,
        "fp8_gemms": bool(fmt) and cuda,  # False: the CPU reference (e4m3 weights and activations, fp32 GEMMs)
        "texts": len(sequences),
        "tokens": n,
        "top1_agreement": totals["agree"] / n,
        "reference_ppl": math.exp(totals["reference_nll"] / n),
        "quantized_ppl": math.exp(totals["quantized_nll"] / n),
        "mean_kl": totals["kl"] / n,
        "per_text": per_text,
    }
    result["ppl_ratio"] = result["quantized_ppl"] / result["reference_ppl"]
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if not cuda else result["device"].lower().replace(" ", "-")
    path = cfg.output_dir / f"quantize-compare-{device}{'-' + cfg.tag if cfg.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def format_summary(result: dict) -> str:
    return (f"{result['texts']} texts, {result['tokens']} predicted tokens: top-1 agreement "
            f"{result['top1_agreement']:.4f}, perplexity {result['reference_ppl']:.3f} (reference) vs "
            f"{result['quantized_ppl']:.3f} (quantized, x{result['ppl_ratio']:.4f}), mean KL {result['mean_kl']:.5f}")
