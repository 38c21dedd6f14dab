"""The native CPU kernels of parallel.lowbit (AdamW8bit step, NF4 dequantize) against the eager torch code.

Tolerance: none. The native kernels exist only to be faster; every parameter, code, absmax and output value
must equal the eager path's bit for bit (same float32 operations in the same order, the same fused
multiply-adds as ATen's vectorised kernels, torch's own sqrt). Also: the build is cached and built once
under concurrency, and a failed build or a kernel that disagrees falls back to eager with one warning.
"""

import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.lowbit import adamw8bit_kernel, native
from parallel.lowbit.adamw8bit import AdamW8bit
from parallel.lowbit.quant import dequantize_nf4, nf4_shard_layout, quantize_nf4

LIBRARY = native.library()
needs_native = pytest.mark.skipif(LIBRARY is None, reason="no C compiler: the native kernels are not built")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_adamw8bit(kernel: str, shapes, steps=4, threads=1, **kwargs):
    """`steps` steps on parameters of `shapes`, gradients of magnitudes 1 .. 1e-3 and some exact zeros."""
    original = native.library
    native.library = original if kernel == "native" else (lambda: None)
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
        opt = AdamW8bit(params, min_8bit_size=1, **kwargs)
        for k in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** -(k % 4)
                p.grad.view(-1)[::7] = 0.0
            opt.step()
    finally:
        native.library = original
        torch.set_num_threads(1)
    return params, opt


def assert_same(a, b) -> None:
    (params_a, opt_a), (params_b, opt_b) = a, b
    for p, q in zip(params_a, params_b, strict=True):
        assert torch.equal(p.view(torch.int32), q.view(torch.int32))
        for key in ("state1", "absmax1", "state2", "absmax2", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


@needs_native
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # the defaults: lerp weight 0.1 (fma(w, g - m, m)), weight decay on
        dict(betas=(0.3, 0.9), weight_decay=0.0, lr=0.1),  # lerp weight 0.7: the other branch; no decay
        dict(block_size=100, eps=1e-3),  # blocks that are not a multiple of 16 values
    ],
)
def test_adamw8bit_native_step_equals_eager_bitwise(kwargs):
    # sizes with tails (5000 = 19 blocks + 136, 257 x 33), one below a block, one of exactly 16 blocks
    shapes = [(5000,), (257, 33), (70,), (4096,)]
    assert_same(run_adamw8bit("native", shapes, **kwargs), run_adamw8bit("eager", shapes, **kwargs))


@needs_native
def test_adamw8bit_native_result_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(adamw8bit_kernel, "NATIVE_GRAIN", 2)  # many work units, shared by both threads
    shapes = [(100, 129), (3000,)]
    assert_same(run_adamw8bit("native", shapes, threads=1), run_adamw8bit("native", shapes, threads=2))


@needs_native
def test_a_native_kernel_that_disagrees_with_eager_is_not_used(monkeypatch):
    # Simulate a torch build whose arithmetic the kernel does not reproduce (unfused multiply-adds): the
    # first-use check must catch it, warn once and leave every step to the eager kernel.
    monkeypatch.setattr(native, "fused_multiply_add", lambda: False)
    monkeypatch.setattr(adamw8bit_kernel, "_NATIVE_CHECKED", {})
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        checked = run_adamw8bit("native", [(600,)])
    assert adamw8bit_kernel._NATIVE_CHECKED == {"ok": False}
    assert_same(checked, run_adamw8bit("eager", [(600,)]))


@needs_native
@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    block_size=st.sampled_from([1, 7, 32, 64, 100]),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e5]),
)
def test_nf4_native_dequantize_equals_torch_bitwise(numel, block_size, double_quant, dtype, scale):
    # scale 1e5 overflows fp16 to infinity and 1e-30 underflows it: the casts must still agree
    w = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * scale
    q = quantize_nf4(w, block_size=block_size, double_quant=double_quant)
    native_out = dequantize_nf4(q, dtype)
    original = native.library
    native.library = lambda: None
    try:
        eager_out = dequantize_nf4(q, dtype)
    finally:
        native.library = original
    assert torch.equal(native_out.view(torch.uint8), eager_out.view(torch.uint8))


@needs_native
@pytest.mark.parametrize("dim", [0, -1])
def test_nf4_native_dequantize_of_a_shard_equals_torch(dim, monkeypatch):
    full = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    shard = full.chunk(2, dim=dim)[1].contiguous()
    q = quantize_nf4(shard, layout=nf4_shard_layout(tuple(full.shape), dim, 1, 2))
    native_out = dequantize_nf4(q, torch.bfloat16)
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(native_out.view(torch.int16), dequantize_nf4(q, torch.bfloat16).view(torch.int16))


def test_a_failed_build_warns_once_and_everything_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_LIBRARY", [])
    with pytest.warns(RuntimeWarning, match="could not be built") as caught:
        assert native.library() is None
        assert native.library() is None
    assert len(caught) == 1
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW8bit([p], min_8bit_size=1).step()
        q = quantize_nf4(torch.randn(300))
        assert dequantize_nf4(q).shape == (300,)


@needs_native
def test_concurrent_builds_compile_once_into_the_cache(monkeypatch, tmp_path):
    # Four threads build at once into an empty cache: one compiles under the lock, the others wait and
    # load its result; no temporary file is left behind, and a later build only finds the cached one.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths: list = []
    threads = [threading.Thread(target=lambda: paths.append(native._build())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    built = sorted((tmp_path / "parallel-lowbit").glob("*.so"))
    assert len(set(paths)) == 1 and built == [paths[0]]
    mtime = built[0].stat().st_mtime_ns
    assert native._build() == built[0] and built[0].stat().st_mtime_ns == mtime
