"""`jetspec-trt build --quantize fp8`: modelopt calibrates the target with the --fp8-recipe asked for (or the
default recipe), the engine stores it in the Hugging Face FP8 layout with the recipe in the manifest, the draft head
stays unquantized, and the engine runs (the FP8 reference on the CPU, losslessly). Also: building from a checkpoint
that is FP8 already, and the refusals."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jetspec_trt.builders.quantize import DEFAULT_FP8_RECIPE, FP8_RECIPES
from jetspec_trt.models.fp8 import FP8_DTYPE
from jetspec_trt.runtime.engine import Engine
from tests.helpers import invoke_cli


def build_args(target, draft, out, *extra):
    return ["build", "--target", str(target), "--draft", str(draft), "--output", str(out), "--budget", "16",
            "--topk", "3", *extra]


def dtypes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("fp8_recipe", [None, "per-tensor"])
def test_build_quantize_fp8(fp8_pair, tmp_path, capsys, fp8_recipe):
    engine = tmp_path / "engine"
    code, _, err = invoke_cli(build_args(fp8_pair.target, fp8_pair.draft, engine, "--quantize", "fp8",
                                         *(["--fp8-recipe", fp8_recipe] if fp8_recipe else []),
                                         "--calib-prompts", str(fp8_pair.calib), "--calib-samples", "4",
                                         "--calib-max-tokens", "16", "--calib-device", "cpu",
                                         # no kernels/ on a GPU machine either: tuning is not what this tests
                                         "--no-tune"), capsys)
    assert code == 0, err
    manifest = json.loads((engine / "manifest.json").read_text())
    recipe = manifest["quantization"]
    name = fp8_recipe or DEFAULT_FP8_RECIPE
    per_channel = FP8_RECIPES[name].weight_scales == "per-channel"
    assert recipe["method"] == "fp8" and recipe["recipe"] == name
    assert recipe["modelopt_config"] == ("FP8_PER_CHANNEL_PER_TOKEN_CFG" if per_channel else "FP8_DEFAULT_CFG")
    assert recipe["format"].startswith("fp8 e4m3 per-channel" if per_channel else "fp8 e4m3 per-tensor")
    assert recipe["calibration"] == {"source": str(fp8_pair.calib), "samples": 4, "tokens": 4 * 16,
                                     "max_tokens": 16, "device": "cpu", "dtype": "float32"}
    assert "lm_head" in recipe["unquantized"] and "the draft head" in recipe["unquantized"]
    assert manifest["weights"]["target"].startswith("hugging-face")
    # the sources are the unquantized checkpoints the user gave
    assert manifest["sources"]["target"]["path"] == str(fp8_pair.target.resolve())
    assert sorted(p.name for p in engine.iterdir()) == ["cost_model.json", "draft", "manifest.json", "runtime_config.json",
                                                        "target"]

    target = dtypes(engine / "target")
    assert target["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert target["model.layers.0.self_attn.q_proj.weight_scale"] == "F32"
    assert ("model.layers.0.self_attn.q_proj.input_scale" in target) is not per_channel  # per-token: none stored
    kept = FP8_RECIPES[name].unquantized_tail_mlps  # the last layers' MLPs stay bf16
    assert target["model.layers.5.mlp.down_proj.weight"] == ("BF16" if kept else "F8_E4M3")
    assert target["model.embed_tokens.weight"] == "BF16" and target["model.norm.weight"] == "BF16"
    config = json.loads((engine / "target" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == ("FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8")
    assert set(dtypes(engine / "draft").values()) == {"BF16"}  # the draft head stays bf16, fused as usual
    assert "layers.0.self_attn.qkv_proj.weight" in dtypes(engine / "draft")

    loaded = Engine.load(engine)
    assert "dequantized" in loaded.summary["quantization"] and "(the reference)" in loaded.summary["quantization"]
    assert loaded.target.layers[0].self_attn.q_proj.weight.dtype != FP8_DTYPE
    code, _, err = invoke_cli(["run", str(engine), "--prompt", "hello", "--max-new-tokens", "20", "--verify"], capsys)
    assert code == 0 and "lossless check: IDENTICAL" in err, err


def test_build_from_an_fp8_checkpoint(fp8_pair, tmp_path, capsys):
    engine = tmp_path / "engine"
    code, _, err = invoke_cli(build_args(fp8_pair.fp8_target, fp8_pair.draft, engine), capsys)
    assert code == 0, err
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["quantization"]["source"] == "the target checkpoint"
    assert dtypes(engine / "target") == dtypes(fp8_pair.fp8_target)  # kept as it is: FP8 + scales + bf16 rest
    assert Engine.load(engine).summary["quantization"].startswith("fp8 e4m3 per-tensor (modelopt, static")
    per_channel = tmp_path / "per-channel"  # scales [N] pass the build's checks and are kept as they are
    code, _, err = invoke_cli(build_args(fp8_pair.per_channel_target, fp8_pair.draft, per_channel), capsys)
    assert code == 0, err
    assert dtypes(per_channel / "target") == dtypes(fp8_pair.per_channel_target)
    assert Engine.load(per_channel).summary["quantization"].startswith("fp8 e4m3 per-channel (modelopt, dynamic")

    code, _, err = invoke_cli(build_args(fp8_pair.fp8_target, fp8_pair.draft, tmp_path / "again", "--quantize",
                                         "fp8"), capsys)
    assert code == 2 and "already quantized" in err and not (tmp_path / "again").exists()
    code, _, err = invoke_cli(build_args(fp8_pair.target, fp8_pair.draft, tmp_path / "trt", "--quantize", "fp8",
                                         "--backend", "tensorrt"), capsys)
    assert code == 2 and "PyTorch engines only" in err
    code, _, err = invoke_cli(build_args(fp8_pair.target, fp8_pair.draft, tmp_path / "recipe", "--quantize", "fp8",
                                         "--fp8-recipe", "per-block"), capsys)
    assert code == 2 and "unknown FP8 recipe 'per-block'; choose one of per-tensor, per-channel, " in err
    code, _, err = invoke_cli(build_args(fp8_pair.target, fp8_pair.draft, tmp_path / "plain", "--fp8-recipe",
                                         "per-tensor"), capsys)
    assert code == 2 and "--fp8-recipe needs --quantize fp8" in err
    assert not (tmp_path / "recipe").exists() and not (tmp_path / "plain").exists()
    code, _, err = invoke_cli(build_args(fp8_pair.fp8_target, fp8_pair.target, tmp_path / "qdraft"), capsys)
    assert code == 2


def test_quantized_draft_is_refused(fp8_pair, tmp_path, capsys):
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(fp8_pair.draft, draft)
    config = json.loads((draft / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (draft / "config.json").write_text(json.dumps(config))
    code, _, err = invoke_cli(build_args(fp8_pair.target, draft, tmp_path / "engine"), capsys)
    assert code == 2 and "draft head is quantized" in err


@pytest.mark.gpu
def test_calibration_on_cuda(fp8_pair, tmp_path):
    """modelopt on the GPU (bf16 model): the same layout, the same weight scales (amax of the same bf16 weights),
    input scales within bf16's effect on the activations' amax."""
    from jetspec_trt.builders.quantize import QuantizeConfig, quantize_target

    recipe = quantize_target(fp8_pair.target, tmp_path / "fp8", QuantizeConfig(calib_source=str(fp8_pair.calib),
                                                                                 calib_samples=6), torch.bfloat16)
    assert recipe["calibration"]["device"] == "cuda" and recipe["calibration"]["dtype"] == "bfloat16"
    gpu, cpu = load_file(str(tmp_path / "fp8" / "model.safetensors")), load_file(str(fp8_pair.fp8_target /
                                                                                     "model.safetensors"))
    assert set(gpu) == set(cpu) and all(gpu[k].dtype == cpu[k].dtype for k in cpu)
    for name in cpu:
        if name.endswith("weight_scale"):
            assert torch.allclose(gpu[name], cpu[name], rtol=1e-6)
        elif name.endswith("input_scale"):
            assert torch.allclose(gpu[name], cpu[name], rtol=0.05)
