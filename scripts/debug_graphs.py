"""Device debugging of graph replays (kept for the record; run through the device tool)."""
import sys
import torch
from jetspec_trt.models.presets import random_models
from jetspec_trt.runtime.config import RuntimeConfig, TreeConfig
from jetspec_trt.runtime.graph_decoder import GraphDecoder

torch.manual_seed(0)
target, draft, _ = random_models("tiny", "cuda", torch.float32)
spec = draft.spec
rt = RuntimeConfig(TreeConfig(64, 4, 7), "float32", 512, spec.block_size, spec.mask_token_id, spec.target_layer_ids, ())
order = sys.argv[1]
dec = GraphDecoder(target, draft, rt)
prompt = list(range(10, 40))
for step in order:
    spec_mode = step == "s"
    print("run", step, "ctx before", int(dec.target_cache.ctx_len), flush=True)
    try:
        out = [t for c in dec.generate(prompt, 20, speculative=spec_mode, tree=TreeConfig(16, 4, 3)) for t in c]
        print(step, "ok", out[:8], "ctx", int(dec.target_cache.ctx_len), flush=True)
    except Exception as e:
        print(step, "FAILED", type(e).__name__, str(e).splitlines()[0], flush=True)
        break
