"""Rotary embeddings: DeepSeek's pair convention, relative-position invariance, YaRN attention scale.

Tolerance: 1e-5 absolute (fp32 trigonometry of the same angles computed two ways).
"""

import math

import torch

from models import MLAConfig, RotaryEmbedding
from models.mla import rope_frequencies, softmax_scale

CONFIG = MLAConfig(qk_rope_head_dim=8, max_seq_len=64)


def _half_split_reference(x, positions, inv_freq):
    """DeepSeek's published form: de-interleave (x0,x2,..,x1,x3,..), then rotate halves."""
    b, h, s, d = x.shape
    x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated_half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated_half * sin


def test_pairs_rotate_like_the_deepseek_reference_up_to_the_same_permutation():
    rope = RotaryEmbedding(CONFIG)
    inv_freq, _ = rope_frequencies(CONFIG)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 1, 10, 8)
    positions = torch.arange(10)
    ours_q, ours_k = rope(q, positions), rope(k, positions)
    ref_q, ref_k = (
        _half_split_reference(q, positions, inv_freq),
        _half_split_reference(k, positions, inv_freq),
    )
    perm = list(range(0, 8, 2)) + list(range(1, 8, 2))
    torch.testing.assert_close(ours_q[..., perm], ref_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours_q @ ours_k.transpose(-1, -2), ref_q @ ref_k.transpose(-1, -2), atol=1e-5, rtol=0
    )


def test_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(CONFIG)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = rope(q.view(1, 1, 1, 8), torch.tensor([i]))
        kj = rope(k.view(1, 1, 1, 8), torch.tensor([j]))
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-5, rtol=0)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_yarn_scales_low_frequencies_and_the_softmax():
    yarn = MLAConfig(
        qk_rope_head_dim=8,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )  # fmt: skip
    plain_freq, _ = rope_frequencies(MLAConfig(qk_rope_head_dim=8))
    yarn_freq, magnitude = rope_frequencies(yarn)
    assert torch.allclose(yarn_freq[0], plain_freq[0])  # highest frequency kept
    torch.testing.assert_close(yarn_freq[-1], plain_freq[-1] / 40)  # lowest frequency interpolated
    assert magnitude == 1.0  # mscale / mscale_all_dim
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(softmax_scale(yarn), yarn.qk_head_dim**-0.5 * mscale**2)
