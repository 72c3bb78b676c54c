"""FP8 checkpoints (models/fp8.py): the layouts modelopt's export gives (what vLLM and TensorRT-LLM read) for the
per-tensor and the per-channel recipe, loading them as the CPU reference (e4m3 weights and activations in float
GEMMs: the FP8 GEMMs' products, close to the unquantized model) or as FP8 GEMMs, checkpoints in the AutoFP8 / vLLM
"fp8" layout and a per-channel one written by hand, and the errors for what the engine does not run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jetspec_trt.errors import JetSpecError
from jetspec_trt.models.checkpoint import load_hf_model, load_target
from jetspec_trt.models.fp8 import FP8_DTYPE, read_fp8_format, require_fp8_device
from jetspec_trt.plugins.fp8_gemm import FP8_MAX, dequantize, quantize

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


@pytest.mark.parametrize("recipe", ["per-tensor", "per-channel"])
def test_cpu_reference_emulates_the_fp8_gemms(fp8_pair, recipe):
    """The CPU reference holds the stored e4m3 values in float32 (exactly) with their scales and rounds each
    projection's input to e4m3 (static input_scale, or per token): the FP8 GEMMs' products in float32 matmuls,
    so it gives torch._scaled_mm's logits up to summation order, not the weights-only rounding of a dequantized
    model (which misses the activations' rounding)."""
    path = fp8_pair.fp8_target if recipe == "per-tensor" else fp8_pair.per_channel_target
    reference = load_target(fp8_pair.target).prefill(TEXT).logits
    model = load_target(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the fp32 reference
    q_proj = model.layers[0].self_attn.q_proj
    stored = load_file(str(path / "model.safetensors"))
    assert torch.equal(q_proj.weight, stored["model.layers.0.self_attn.q_proj.weight"].float())
    if recipe == "per-tensor":
        assert q_proj.weight_scale.shape == () and q_proj.input_scale.shape == ()
    else:
        assert q_proj.weight_scale.shape == (q_proj.out_features,) and q_proj.input_scale is None
    logits = model.prefill(TEXT).logits
    # FP8 rounds every weight and input by up to 6%: the logits move, but stay close; a different model would be
    # ~1.4 away. (The random tiny model has many near ties: the top-1 flips where its margins are small.)
    assert 1e-4 < rel(logits, reference) < 0.2
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.7
    fp8_gemms = load_target(path, keep_fp8=True).prefill(TEXT).logits  # torch._scaled_mm's CPU kernel
    assert torch.allclose(fp8_gemms, logits, atol=1e-4, rtol=1e-4)
    # transformers' model of the checkpoint is dequantized, weights only: further from the FP8 GEMMs than the
    # reference is
    hf = load_hf_model(path)(torch.tensor([TEXT])).logits[0]
    assert rel(hf, fp8_gemms) > 20 * rel(logits, fp8_gemms)


def test_fp8_gemms_run_the_checkpoint_as_stored(fp8_pair):
    """keep_fp8: FP8 weights and torch._scaled_mm (torch's CPU kernel here; tensor cores on CUDA), close to the
    unquantized model; fusing q/k/v and gate/up (one shared scale per group) changes nothing."""
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


def hand_written_checkpoint(src, dst, quantization_config, per_channel=False, scale_shape=(1,)):
    """The target quantized here, as another producer writes it: no input_scale (dynamic activations); one scale
    per Linear (q/k/v differ), stored as `scale_shape`, or per_channel: one per row, stored as [N, 1]
    (TensorRT-LLM's shape; `scale_shape` (-1,) stores [N])."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        name = name if name.startswith("model.") else "model." + name
        if any(name.endswith(f"{p}.weight") for p in PROJECTIONS):
            amax = tensor.float().abs().amax(dim=1, keepdim=True) if per_channel else tensor.float().abs().max()
            scale = amax / FP8_MAX
            out[name] = quantize(tensor, scale)
            stored = scale.reshape(scale_shape) if per_channel else scale.reshape(1).expand(scale_shape)
            out[name.removesuffix("weight") + "weight_scale"] = stored.contiguous()
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def autofp8_checkpoint(src, dst, scale_shape=(1,), block=False):
    """The AutoFP8 / vLLM "fp8" layout: dynamic activations, per-tensor scales stored as [1]."""
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
    return hand_written_checkpoint(src, dst, quant | ({"weight_block_size": [128, 128]} if block else {}),
                                   scale_shape=scale_shape)


def per_channel_checkpoint(src, dst, scale_shape=(-1, 1)):
    """modelopt's FP8_PER_CHANNEL_PER_TOKEN layout written by hand, in config.json only (no hf_quant_config)."""
    quant = {"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "ignore": ["lm_head"]}
    return hand_written_checkpoint(src, dst, quant, per_channel=True, scale_shape=scale_shape)


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


def test_modelopt_per_channel_export(fp8_pair):
    """The per-channel recipe (FP8_PER_CHANNEL_PER_TOKEN_CFG): quant_algo FP8_PER_CHANNEL_PER_TOKEN in both config
    files, a weight_scale per output row (its amax / 448, nothing shared across a fused group), no input_scale."""
    path = fp8_pair.per_channel_target
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "modelopt" and quant["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    side = json.loads((path / "hf_quant_config.json").read_text())
    assert side["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    fmt = read_fp8_format(path)
    assert (fmt.method, fmt.activation_scheme, fmt.weight_scales) == ("modelopt", "dynamic", "per-channel")
    assert fmt.describe() == "fp8 e4m3 per-channel (modelopt, dynamic activation scales)"
    tensors = load_file(str(path / "model.safetensors"))
    original = {k: v.float() for k, v in load_file(str(fp8_pair.target / "model.safetensors")).items()}
    assert not any(k.endswith("input_scale") for k in tensors)
    for layer in range(6):
        for proj in PROJECTIONS:
            name = f"model.layers.{layer}.{proj}"
            weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
            w = original[f"layers.{layer}.{proj}.weight"]
            assert weight.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
            assert torch.allclose(scale, w.abs().amax(dim=1) / FP8_MAX, rtol=1e-2)
            error = (dequantize(weight, scale, torch.float32) - w).abs()
            assert bool((error <= torch.maximum(w.abs() / 16, scale[:, None] * 2.0**-9) + 1e-6).all())
    recipe = fp8_pair.per_channel_recipe
    assert recipe["recipe"] == "per-channel" and recipe["modelopt_config"] == "FP8_PER_CHANNEL_PER_TOKEN_CFG"
    assert recipe["activations"].startswith("dynamic") and fp8_pair.recipe["recipe"] == "per-tensor"


def test_hand_written_per_channel_checkpoint_loads(fp8_pair, tmp_path):
    """modelopt's per-channel layout written by hand, scales as [N, 1] (TensorRT-LLM's shape) or [N]: the same
    model; the reference, the FP8 GEMMs and the fused GEMMs (scales concatenated with the rows) agree."""
    column = per_channel_checkpoint(fp8_pair.target, tmp_path / "column")
    flat = per_channel_checkpoint(fp8_pair.target, tmp_path / "flat", scale_shape=(-1,))
    fmt = read_fp8_format(column)
    assert (fmt.activation_scheme, fmt.weight_scales) == ("dynamic", "per-channel")
    logits = load_target(column).prefill(TEXT).logits
    assert torch.equal(load_target(flat).prefill(TEXT).logits, logits)
    assert rel(logits, load_target(fp8_pair.target).prefill(TEXT).logits) < 0.15
    assert torch.allclose(load_target(column, fused_gemm=True).prefill(TEXT).logits, logits, atol=1e-4, rtol=1e-4)
    model = load_target(column, keep_fp8=True)
    attn = model.layers[0].self_attn
    scales = [p.weight_scale for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert attn.q_proj.weight.dtype == FP8_DTYPE and scales[0].shape == (attn.q_proj.out_features,)
    assert torch.allclose(model.prefill(TEXT).logits, logits, atol=1e-4, rtol=1e-4)
    model.fuse_weights()
    assert attn.qkv_weight.dtype == FP8_DTYPE and torch.equal(attn.qkv_weight_scale, torch.cat(scales))
    assert torch.equal(attn.k_proj.weight_scale, scales[1])  # each part keeps its own rows' scales
    assert torch.allclose(model.prefill(TEXT).logits, logits, atol=1e-4, rtol=1e-4)


def test_bad_per_channel_checkpoints_are_refused(fp8_pair, tmp_path):
    from jetspec_trt.builders.validate import check_pair

    def broken(name, change, quant_algo=None):
        path = per_channel_checkpoint(fp8_pair.target, tmp_path / name)
        state = load_file(str(path / "model.safetensors"))
        change(state)
        save_file(state, str(path / "model.safetensors"))
        if quant_algo:
            config = json.loads((path / "config.json").read_text())
            config["quantization_config"]["quant_algo"] = quant_algo
            (path / "config.json").write_text(json.dumps(config))
        return path

    q = "model.layers.0.self_attn.q_proj"
    cases = [(broken("rows", lambda s: s.update({f"{q}.weight_scale": torch.ones(5)})),
              r"\[N\] or \[N, 1\] with N = 128"),
             (broken("input", lambda s: s.update({f"{q}.input_scale": torch.ones(())})), "no input scales"),
             (broken("algo", lambda s: None, quant_algo="FP8"), "need quant_algo FP8_PER_CHANNEL_PER_TOKEN")]
    for path, match in cases:
        with pytest.raises(JetSpecError, match=match):
            load_target(path)
        with pytest.raises(JetSpecError, match=match):  # the build's check, before any weight is read
            check_pair(path, fp8_pair.draft)


def test_tail_bf16_recipe_keeps_the_last_mlps_unquantized(fp8_pair):
    """per-channel-tail-bf16: the last 3 layers' gate/up/down stay bf16 (no scales), listed in modelopt's ignore;
    everything else as the per-channel recipe. The reference and the fused FP8 GEMMs run the mix."""
    path = fp8_pair.fp8_targets["per-channel-tail-bf16"]
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert {f"model.layers.{i}.mlp*" for i in (3, 4, 5)} <= set(quant["ignore"])
    tensors = load_file(str(path / "model.safetensors"))
    for layer in range(6):
        for proj in PROJECTIONS:
            kept = layer >= 3 and proj.startswith("mlp.")
            name = f"model.layers.{layer}.{proj}"
            assert tensors[f"{name}.weight"].dtype == (torch.bfloat16 if kept else FP8_DTYPE)
            assert (f"{name}.weight_scale" in tensors) is not kept
    recipe = fp8_pair.recipes["per-channel-tail-bf16"]
    assert "model.layers.5.mlp*" in recipe["unquantized"]
    model = load_target(path)
    assert model.layers[5].mlp.down_proj.weight_scale is None and model.layers[5].self_attn.q_proj.weight_scale is not None
    logits = model.prefill(TEXT).logits
    reference = load_target(fp8_pair.target).prefill(TEXT).logits
    assert rel(logits, reference) < rel(load_target(fp8_pair.per_channel_target).prefill(TEXT).logits, reference)
    fused = load_target(path, fused_gemm=True, keep_fp8=True)
    assert fused.layers[5].mlp.gate_up_weight.dtype == torch.float32 and fused.layers[0].mlp.gate_up_weight.dtype == FP8_DTYPE
    assert torch.allclose(fused.prefill(TEXT).logits, logits, atol=1e-4, rtol=1e-4)


def test_partly_quantized_fused_group_is_refused(fp8_pair, tmp_path):
    """One GEMM cannot take FP8 and unquantized rows: q FP8 with k/v bf16 runs unfused on the CPU, and is refused
    with an error where the projections are fused (the GPU engine)."""
    path = per_channel_checkpoint(fp8_pair.target, tmp_path / "mixed")
    state = load_file(str(path / "model.safetensors"))
    original = load_file(str(fp8_pair.target / "model.safetensors"))
    for proj in ("k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        state[f"{name}.weight"] = original[f"layers.0.self_attn.{proj}.weight"]
        del state[f"{name}.weight_scale"]
    save_file(state, str(path / "model.safetensors"))
    assert load_target(path).prefill(TEXT).logits.shape == (len(TEXT), 260)
    with pytest.raises(JetSpecError, match="mix FP8 and unquantized weights"):
        load_target(path, fused_gemm=True)
