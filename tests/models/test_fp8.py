"""FP8 checkpoints (models/fp8.py): the layout modelopt's export gives (what vLLM and TensorRT-LLM read), loading
it dequantized on the CPU (close to the unquantized model) or as FP8 GEMMs, checkpoints in the AutoFP8 / vLLM
"fp8" layout, and the errors for what the engine does not run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_hf_model, load_target
from jetspec_trt.models.fp8 import FP8_DTYPE, read_fp8_format, require_fp8_device
from jetspec_trt.plugins.fp8_gemm import FP8_MAX, quantize

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
GROUPS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj")}
TEXT = list(b"The quick brown fox jumps over the lazy dog. def add(a, b): return a + b")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def group_of(proj):
    return next((g for g in GROUPS.values() if proj in g), (proj,))


def test_modelopt_export_is_the_layout_vllm_and_trtllm_read(fp8_pair):
    config = json.loads((fp8_pair.fp8_target / "config.json").read_text())
    quant = config["quantization_config"]
    # vLLM's ModelOptFp8Config: quant_method "modelopt" + quant_algo "FP8"; TensorRT-LLM reads hf_quant_config.json.
    assert quant["quant_method"] == "modelopt" and quant["quant_algo"] == "FP8" and "lm_head" in quant["ignore"]
    side = json.loads((fp8_pair.fp8_target / "hf_quant_config.json").read_text())
    assert side["quantization"]["quant_algo"] == "FP8" and side["producer"]["name"] == "modelopt"
    assert config["dtype"] == "bfloat16" and (fp8_pair.fp8_target / "tokenizer.json").is_file()
    fmt = read_fp8_format(fp8_pair.fp8_target)
    assert (fmt.method, fmt.activation_scheme) == ("modelopt", "static")

    tensors = load_file(str(fp8_pair.fp8_target / "model.safetensors"))
    original = {k: v.float() for k, v in load_file(str(fp8_pair.target / "model.safetensors")).items()}
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings / lm_head (tied) unquantized
    assert not any(k.startswith("lm_head") for k in tensors)
    for layer in range(6):
        assert tensors[f"model.layers.{layer}.input_layernorm.weight"].dtype == torch.bfloat16
        for proj in PROJECTIONS:
            name = f"model.layers.{layer}.{proj}"
            weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
            assert weight.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.numel() == 1
            assert tensors[f"{name}.input_scale"].dtype == torch.float32 and float(tensors[f"{name}.input_scale"]) > 0
            # weight_scale = amax(|W|) / 448, the amax shared by the group the engine fuses into one GEMM
            group_amax = max(float(original[f"layers.{layer}.{p}.weight"].abs().max()) for p in group_of(proj))
            assert float(scale) == pytest.approx(group_amax / FP8_MAX, rel=1e-2)
            # each weight rounded once to e4m3: relative error <= 2^-4 (3 mantissa bits), absolute for subnormals
            w = original[f"layers.{layer}.{proj}.weight"]
            error = (weight.float() * scale - w).abs()
            assert bool((error <= torch.maximum(w.abs() / 16, scale * 2.0**-9) + 1e-6).all())
    assert fp8_pair.recipe["calibration"]["samples"] == 6 and fp8_pair.recipe["tool"].startswith("nvidia-modelopt")


def test_cpu_reference_is_dequantized_and_close_to_unquantized(fp8_pair):
    reference = load_target(fp8_pair.target).prefill(TEXT).logits
    model = load_target(fp8_pair.fp8_target)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # dequantized: the fp32 reference
    assert model.layers[0].self_attn.q_proj.weight_scale is None
    logits = model.prefill(TEXT).logits
    # FP8 rounds every weight by up to 6%: the logits move, but stay close; a different model would be ~1.4 away.
    assert 1e-4 < rel(logits, reference) < 0.15
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.8
    # transformers' model of the same checkpoint (dequantized) computes the same logits
    hf = load_hf_model(fp8_pair.fp8_target)(torch.tensor([TEXT])).logits[0]
    assert torch.allclose(hf, logits, atol=1e-4, rtol=1e-4)


def test_fp8_gemms_run_the_checkpoint_as_stored(fp8_pair):
    """keep_fp8: FP8 weights and torch._scaled_mm (torch's CPU kernel here; tensor cores on CUDA). Activations are
    rounded to e4m3 too, so the logits sit a little further from the unquantized model than the dequantized
    reference; fusing q/k/v and gate/up (one shared scale per group) changes nothing."""
    reference = load_target(fp8_pair.target).prefill(TEXT).logits
    dequantized = load_target(fp8_pair.fp8_target).prefill(TEXT).logits
    model = load_target(fp8_pair.fp8_target, keep_fp8=True)
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == FP8_DTYPE and q_proj.weight_scale.shape == () and q_proj.input_scale is not None
    assert model.lm_head.weight.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.float32
    logits = model.prefill(TEXT).logits
    assert rel(logits, dequantized) < 0.15 and rel(logits, reference) < 0.2
    model.fuse_weights()
    assert model.layers[0].self_attn.qkv_weight.dtype == FP8_DTYPE
    assert torch.equal(model.layers[0].self_attn.qkv_weight_scale, q_proj.weight_scale)
    assert torch.allclose(model.prefill(TEXT).logits, logits, atol=1e-5, rtol=1e-5)


def autofp8_checkpoint(src, dst, scale_shape=(1,), block=False):
    """The target as another producer writes it: AutoFP8 / vLLM "fp8" layout, dynamic activations (no
    input_scale), one scale per Linear (q/k/v differ), scales stored as [1]."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        if any(name.endswith(f"{p}.weight") for p in PROJECTIONS):
            scale = tensor.float().abs().max() / FP8_MAX
            out[name] = quantize(tensor, scale)
            out[name.removesuffix("weight") + "weight_scale"] = scale.reshape(1).expand(scale_shape).contiguous()
        else:
            out["model." + name] = tensor
    out = {("model." + k if not k.startswith("model.") else k): v for k, v in out.items()}
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "ignored_layers": ["lm_head"]}
    if block:
        config["quantization_config"]["weight_block_size"] = [128, 128]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_others_fp8_checkpoints_load(fp8_pair, tmp_path):
    path = autofp8_checkpoint(fp8_pair.target, tmp_path / "autofp8")
    fmt = read_fp8_format(path)
    assert (fmt.method, fmt.activation_scheme, fmt.excluded) == ("fp8", "dynamic", ("lm_head",))
    reference = load_target(fp8_pair.target).prefill(TEXT).logits
    assert rel(load_target(path).prefill(TEXT).logits, reference) < 0.15
    model = load_target(path, keep_fp8=True)
    assert model.layers[0].self_attn.q_proj.input_scale is None  # dynamic: scaled per call
    logits = model.prefill(TEXT).logits
    assert rel(logits, reference) < 0.2
    # q/k/v scales differ here: fusing requantizes the parts to the largest scale, one more e4m3 rounding each
    attn = model.layers[0].self_attn
    parts = [(p.weight.float() * p.weight_scale) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    scales = torch.stack([attn.q_proj.weight_scale, attn.k_proj.weight_scale, attn.v_proj.weight_scale])
    assert len(set(scales.tolist())) == 3
    model.fuse_weights()
    assert torch.equal(attn.qkv_weight_scale, scales.max())
    fused = attn.qkv_weight.float() * attn.qkv_weight_scale
    wanted = torch.cat(parts)
    assert bool(((fused - wanted).abs() <= torch.maximum(wanted.abs() / 16, scales.max() * 2.0**-9) + 1e-7).all())
    assert not torch.equal(fused, wanted)  # k/v really were requantized
    assert rel(model.prefill(TEXT).logits, reference) < 0.2


def test_unsupported_quantizations_are_refused(fp8_pair, tmp_path):
    block = autofp8_checkpoint(fp8_pair.target, tmp_path / "block", block=True)
    with pytest.raises(JetSpecError, match="block-scaled"):
        load_target(block)
    channel = autofp8_checkpoint(fp8_pair.target, tmp_path / "channel", scale_shape=(128,))
    config = json.loads((channel / "config.json").read_text())
    config["quantization_config"].pop("weight_block_size", None)
    (channel / "config.json").write_text(json.dumps(config))
    state = load_file(str(channel / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(128)
    save_file(state, str(channel / "model.safetensors"))
    with pytest.raises(JetSpecError, match="per-tensor"):
        load_target(channel)
    for quant, match in (({"quant_method": "awq"}, "quant_method 'awq'"),
                         ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo 'NVFP4'"),
                         ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}, "KV")):
        other = tmp_path / quant.get("quant_algo", quant["quant_method"]) / "m"
        shutil.copytree(fp8_pair.fp8_target, other)
        config = json.loads((other / "config.json").read_text()) | {"quantization_config": quant}
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(JetSpecError, match=match):
            load_target(other)


def test_gpu_without_fp8_is_refused(fp8_pair, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(JetSpecError, match=r"A100.*compute capability 8\.0.*8\.9"):
        require_fp8_device("cuda")
    with pytest.raises(JetSpecError, match="no FP8 tensor cores"):  # before any weight reaches the device
        load_target(fp8_pair.fp8_target, torch.bfloat16, "cuda")
    require_fp8_device("cpu")  # torch's CPU kernels run FP8 GEMMs
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8_device("cuda")
