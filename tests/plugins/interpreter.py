"""Run a test module's check function in Triton's CPU interpreter, so CI checks our kernels without a GPU.

The check function takes the device first; the same function runs on CUDA in a gpu-marked test. It runs in a
subprocess because Triton reads TRITON_INTERPRET once, when it is first imported (this process may have imported
it already, compiling for the GPU). The interpreter runs each program of a grid one after the other on numpy, about
a thousand times slower than a GPU: interpreter checks use small shapes.

Known gap of the interpreter (Triton 3.6): it stores bfloat16 as uint16 and computes tl.dot (and bf16 arithmetic)
on the bit patterns (triton-lang/triton#11584, "we just don't support it yet"); only casts convert. Kernels that
dot or add bf16 values are checked in float16 and float32 here, bf16 on CUDA only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from jetspec_trt.plugins.triton_tree_attention import triton  # None where Triton is missing or fails to import

ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed (or fails to import)")


def run_in_interpreter(check: Callable, *args, timeout: float = 300) -> None:
    """check("cpu", *args) in a subprocess with TRITON_INTERPRET=1; fails with the subprocess's stderr tail.
    `check` must be a module-level function of a file under the repository, args literals (passed by repr)."""
    module = ".".join(Path(check.__code__.co_filename).resolve().relative_to(ROOT).with_suffix("").parts)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    call = f"from {module} import {check.__name__} as check; check('cpu', *{args!r})"
    run = subprocess.run([sys.executable, "-c", call], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]


def compile_for_hopper(kernel, constants: dict, types: dict[str, str] | None = None, **options):
    """`kernel` (a @triton.jit function) compiled ahead of time for sm_90, no GPU needed: what only Triton's compiler
    checks (shared memory, tl.dot shapes, types across constexpr branches) fails on the CPU rather than in a GPU
    lease. `constants` are the constexprs (others keep their defaults); each other argument's type comes from
    `types` by name, else "*bf16" for a pointer (a name ending in _ptr) and "i32" for a scalar. `options`: the
    compile options (num_warps, num_stages, launch_pdl, ...). Returns the compiled kernel (its .asm)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default} | constants
    types = types or {}
    signature = {name: "constexpr" if name in constants
                 else types.get(name, "*bf16" if name.endswith("_ptr") else "i32") for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)

