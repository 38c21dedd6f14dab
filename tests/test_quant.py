"""Block-wise quantization: the code books, nearest-code rounding, NF4 packing, error and storage accounting.

Tolerances: code tables derived from their definitions in float64 are compared with the stored float32
tables to 5e-7 absolute (float32 spacing near 1 is 6e-8; the published NF4 table was itself computed with
scipy and rounded to float32, 1.1e-7 away from our float64 derivation). Rounding is compared *exactly*
with argmin over the code book in float64 (the difference of two float32 numbers of the magnitudes that
decide a tie is exact in float64). Round-trip errors are statistical figures on 2^20 Gaussian samples,
checked against bounds a few percent above the measured values.
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.lowbit.quant import (
    NF4_CODE,
    create_dynamic_map,
    dequantize_blockwise,
    dequantize_nf4,
    nf4_absmax,
    quantize_blockwise,
    quantize_nf4,
    rounding_tables,
    rounding_thresholds,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded: on a shared 2-core machine intra-op threads wait on each other for milliseconds
    per operation, which turns a one-second test into a minute. Every comparison here is made within one
    process, under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SIGNED = create_dynamic_map(signed=True)
UNSIGNED = create_dynamic_map(signed=False)


def nearest_by_argmin(
    x: torch.Tensor, code: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per block, divide by the absmax in float32, then argmin of |v - code| in float64."""
    flat = x.reshape(-1).float()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % block_size)]).view(-1, block_size)
    absmax = flat.abs().amax(dim=1)
    v = flat / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    distance = (v.double().reshape(-1, 1) - code.double().reshape(1, -1)).abs()
    return distance.argmin(dim=1).to(torch.uint8), absmax


# ---------------------------------------------------------------------------------------------- code books


def test_nf4_code_is_the_qlora_table_derived_from_normal_quantiles():
    offset = 0.9677083  # QLoRA: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    derived = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    derived /= derived.abs().max()
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    torch.testing.assert_close(NF4_CODE.double(), derived, rtol=0, atol=5e-7)


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_dynamic_maps_have_256_sorted_distinct_values(code):
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] > code[:-1]).all())


def test_signed_dynamic_map_zero_and_extremes():
    # 127 negative codes, then 0, then 127 positive codes and 1: the top decade has 64 midpoints of
    # linspace(0.1, 1, 65), the largest being 1 - 0.9/128; the bottom decade one midpoint, 0.55e-6.
    assert SIGNED[127] == 0.0 and int((SIGNED < 0).sum()) == 127
    assert SIGNED[255] == 1.0
    assert SIGNED[0].item() == pytest.approx(-(1 - 0.9 / 128), abs=1e-7)
    assert SIGNED[254].item() == pytest.approx(1 - 0.9 / 128, abs=1e-7)
    assert SIGNED[128].item() == pytest.approx(0.55e-6, rel=1e-6)
    torch.testing.assert_close(SIGNED[:127], -SIGNED[128:255].flip(0), rtol=0, atol=0)


def test_unsigned_dynamic_map_zero_and_extremes():
    # 2^(d+1) midpoints per decade: 2 + 4 + ... + 128 = 254 codes, plus 0 and 1; top decade 128 intervals.
    assert UNSIGNED[0] == 0.0 and UNSIGNED[255] == 1.0 and int((UNSIGNED > 0).sum()) == 255
    assert UNSIGNED[254].item() == pytest.approx(1 - 0.9 / 256, abs=1e-7)
    assert UNSIGNED[1].item() == pytest.approx(0.325e-6, rel=1e-6)
    assert UNSIGNED[2].item() == pytest.approx(0.775e-6, rel=1e-6)


def test_dynamic_map_rejects_a_definition_without_256_values():
    with pytest.raises(ValueError, match="distinct values"):
        create_dynamic_map(signed=False, max_exponent_bits=4)


def test_thresholds_sit_exactly_on_or_below_the_midpoints():
    for code in (SIGNED, UNSIGNED, NF4_CODE):
        t = rounding_thresholds(code).double()
        mid = (code[1:].double() + code[:-1].double()) / 2
        above = torch.nextafter(t.float(), torch.full_like(t.float(), math.inf)).double()
        assert bool((t <= mid).all()) and bool((above > mid).all())


def argmin_in_chunks(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return torch.cat([nearest_index(chunk, code) for chunk in values.split(4096)])


def nearest_index(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (values.double().reshape(-1, 1) - code.double().reshape(1, -1)).abs().argmin(dim=1)


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED, NF4_CODE], ids=["signed", "unsigned", "nf4"])
def test_table_rounding_equals_argmin_at_every_cell_edge_and_threshold(code):
    # The lookup tables are exact only if no 16-bit cell holds two thresholds: check the worst places,
    # both ends of every cell in [-1, 1] and each threshold with its two float32 neighbours.
    tables = rounding_tables(code)
    assert tables.cell_code is not None, "this code book should use the lookup tables"
    keys = torch.arange(65536, dtype=torch.int64)
    first = ((keys << 16) - (keys >= 0x8000).long() * 2**32).to(torch.int32)
    edges = torch.cat([first, first | 0xFFFF]).view(torch.float32)
    edges = edges[edges.isfinite() & (edges.abs() <= 1)]
    t = tables.thresholds
    neighbours = [torch.nextafter(t, torch.full_like(t, x)) for x in (math.inf, -math.inf)]
    values = torch.cat([edges, t, *neighbours])
    assert torch.equal(tables.encode(values).long(), argmin_in_chunks(values, code))


def test_a_code_book_too_dense_for_the_tables_falls_back_to_binary_search():
    code = 0.5 + 1e-6 * torch.arange(256, dtype=torch.float32)
    code[0] = -1.0
    assert rounding_tables(code).cell_code is None
    x = torch.cat(
        [torch.tensor([1.0]), 0.5 + 3e-4 * torch.rand(1000, generator=torch.Generator().manual_seed(0))]
    )
    codes, _ = quantize_blockwise(x, code, block_size=x.numel())
    assert torch.equal(codes.long(), nearest_index(x, code))


# ------------------------------------------------------------------------------------ block-wise 8-bit


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e4]))
    x = torch.randn(shape, generator=generator) * scale
    if draw(st.booleans()):  # heavy tails and exact zeros, as in optimizer state
        x = x**3 * (torch.rand(shape, generator=generator) > 0.3)
    return x


@settings(max_examples=200, deadline=None)
@given(x=tensors(), block_size=st.integers(1, 300), signed=st.booleans())
def test_quantize_blockwise_equals_argmin_rounding(x, block_size, signed):
    code = SIGNED if signed else UNSIGNED
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, code, block_size)
    expected_codes, expected_absmax = nearest_by_argmin(x, code, block_size)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert torch.equal(codes, expected_codes)
    assert torch.equal(absmax, expected_absmax)
    restored = dequantize_blockwise(codes, absmax, code, block_size, x.shape)
    assert restored.shape == x.shape
    expected = code[expected_codes.long()].view(-1, block_size) * expected_absmax.unsqueeze(1)
    assert torch.equal(restored.reshape(-1), expected.reshape(-1)[: x.numel()])


def test_rounding_of_values_exactly_between_codes_goes_to_the_lower_code():
    # 0.25 and 0.75 lie exactly halfway between neighbouring codes of this toy code book
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([1.0, 0.25, 0.75, -0.5, 0.0])  # absmax 1
    codes, _ = quantize_blockwise(x, code, block_size=5)
    assert codes.tolist() == [3, 1, 2, 0, 1]


def test_zero_block_decodes_to_zeros():
    x = torch.zeros(10)
    x[7:] = torch.tensor([0.5, -2.0, 1.0])
    codes, absmax = quantize_blockwise(x, SIGNED, block_size=5)
    assert absmax.tolist() == [0.0, 2.0]
    restored = dequantize_blockwise(codes, absmax, SIGNED, 5, x.shape)
    assert torch.equal(restored[:5], torch.zeros(5)) and restored[8] == 2.0 * SIGNED[0]


def test_quantize_blockwise_rejects_non_finite_input():
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_blockwise(torch.tensor([1.0, math.nan]), SIGNED, 2)


def test_dynamic_8bit_round_trip_error_on_gaussian():
    # Measured on 2^20 N(0,1) values in blocks of 256: relative RMSE 0.0108 (signed map), i.e. the
    # dynamic map keeps ~1% error while covering seven decades.
    x = torch.randn(2**20, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_blockwise(x, SIGNED, 256)
    restored = dequantize_blockwise(codes, absmax, SIGNED, 256, x.shape)
    rel_rmse = ((restored - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert rel_rmse < 0.012


# ------------------------------------------------------------------------------------------------- NF4


def test_nf4_packs_the_first_element_in_the_high_nibble():
    # with absmax 1 the values are the codes themselves: indices 15, 0, 7, 8, 1, 14
    w = NF4_CODE[[15, 0, 7, 8, 1, 14]]
    q = quantize_nf4(w, block_size=6, double_quant=False)
    assert q.packed.dtype == torch.uint8
    assert q.packed.tolist() == [0xF0, 0x78, 0x1E]
    assert torch.equal(dequantize_nf4(q), w)


def test_nf4_round_trip_error_on_gaussian_weights():
    # Measured on 2^20 N(0,1) values, block 64: mean |error| 0.0728 and RMSE 0.0920 (in units of the
    # standard deviation); 0.0729 and 0.0920 with double quantization. A uniform 4-bit absmax
    # quantizer (15 levels -7..7) on the same blocks gives 0.108 RMSE: NF4 must beat it, as the
    # paper's information-theoretic argument for normally distributed weights says it should.
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for double_quant in (False, True):
        restored = dequantize_nf4(quantize_nf4(w, double_quant=double_quant))
        error = restored - w
        assert error.abs().mean().item() == pytest.approx(0.0728, rel=0.02)
        assert error.pow(2).mean().sqrt().item() == pytest.approx(0.0920, rel=0.02)
    blocks = w.view(-1, 64)
    step = blocks.abs().amax(dim=1, keepdim=True) / 7
    uniform_rmse = ((blocks / step).round() * step - blocks).pow(2).mean().sqrt().item()
    assert uniform_rmse > 1.1 * error.pow(2).mean().sqrt().item()


@pytest.mark.parametrize(
    "numel, block_size, double_quant, expected",
    [
        (64 * 256 * 4, 64, False, Fraction(9, 2)),
        (
            64 * 256 * 4,
            64,
            True,
            Fraction(4) + Fraction(8, 64) + Fraction(32, 64 * 256) + Fraction(32, 65536),
        ),
        # 100 values: 2 blocks of 64 (128 codes = 64 bytes), 2 absmax codes, one group scale, the mean
        (100, 64, False, Fraction(64 * 8 + 2 * 32, 100)),
        (100, 64, True, Fraction(64 * 8 + 2 * 8 + 32 + 32, 100)),
    ],
)
def test_nf4_storage_bits_are_exact(numel, block_size, double_quant, expected):
    q = quantize_nf4(torch.randn(numel), block_size=block_size, double_quant=double_quant)
    assert Fraction(q.storage_bits(), numel) == expected
    assert q.bits_per_parameter() == pytest.approx(float(expected), rel=1e-12)


def test_nf4_double_quant_bits_approach_4_127_on_a_large_matrix():
    q = quantize_nf4(torch.randn(4096, 1024))
    assert q.bits_per_parameter() == pytest.approx(4.127, abs=5e-4)


@settings(max_examples=100, deadline=None)
@given(
    x=tensors(),
    block_size=st.integers(1, 130),
    double_quant=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_nf4_round_trip_any_shape_and_block_size(x, block_size, double_quant, dtype):
    x = x.clamp(-6e4, 6e4).to(dtype)
    q = quantize_nf4(x, block_size=block_size, double_quant=double_quant)
    restored = dequantize_nf4(q)
    assert restored.shape == x.shape and restored.dtype == dtype
    assert q.packed.numel() == math.ceil(q.n_blocks * block_size / 2)
    # Each value lands on its nearest code times its block's scale (decoded scale under double quant).
    codes, _ = nearest_by_argmin(x, NF4_CODE, block_size)
    unpacked = torch.stack([q.packed >> 4, q.packed & 15], -1).reshape(-1)[: codes.numel()]
    assert torch.equal(unpacked, codes)
    if not double_quant:
        _, absmax = nearest_by_argmin(x, NF4_CODE, block_size)
        expected = (NF4_CODE[codes.long()].view(-1, block_size) * absmax.unsqueeze(1)).reshape(-1)
        assert torch.equal(restored.reshape(-1), expected[: x.numel()].to(dtype))


def test_nf4_double_quant_scales_are_close_to_the_exact_absmax():
    # The 8-bit dynamic code on (absmax - mean) keeps each scale to within 1% of its block's range of
    # centred absmaxes; measured worst relative error 0.65% on Gaussian weights.
    from parallel.lowbit.quant import nf4_absmax

    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    exact = nf4_absmax(quantize_nf4(w, double_quant=False))
    decoded = nf4_absmax(quantize_nf4(w, double_quant=True))
    assert ((decoded - exact).abs() / exact).max().item() < 0.01


def test_nf4_rejects_non_float_and_non_finite_input():
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_nf4(torch.tensor([1.0, math.inf]))


def test_nf4_moves_between_devices_with_its_fields():
    q = quantize_nf4(torch.randn(300), block_size=64)
    moved = q.to("cpu")
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(q)) and moved.double_quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, block_size, double_quant", [((37, 29), 64, True), ((5, 7), 5, False)])
def test_nf4_dequantize_equals_code_times_absmax_cast_once(dtype, shape, block_size, double_quant):
    # The byte-pair table, in-place scale and single cast must give exactly code[q] * absmax in fp32,
    # cast to the output dtype: odd block sizes put a byte's two nibbles in different blocks.
    q = quantize_nf4(torch.randn(shape), block_size=block_size, double_quant=double_quant)
    unpacked = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=-1).reshape(-1)[: q.n_blocks * block_size]
    scales = nf4_absmax(q).repeat_interleave(block_size)
    expected = (NF4_CODE[unpacked.long()] * scales)[: q.numel].reshape(shape).to(dtype)
    got = dequantize_nf4(q, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.view(-1).float().view(torch.int32), expected.view(-1).float().view(torch.int32))
