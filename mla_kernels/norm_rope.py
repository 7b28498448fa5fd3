"""The latent's RMSNorm and the query's and the key's rope in one launch: ``norm_and_rope``.

After its projections an MLA layer normalizes the latent (``kv_a_layernorm``) and rotates the query's and the key's
rope parts: three launches of ``rms_norm``'s and ``rope``'s kernels per layer and step, each a few microseconds of
host work in an eager decode step. ``_norm_rope_kernel`` is those three launches in one: its programs are theirs side
by side (the norm's first, then the query's rope, then the key's), each running the same body (``norm._rms_norm_rows``,
``rope._rope_rows``) on the same block of rows as in its own launch, with the norm's warps (the rope is elementwise:
its values do not depend on the warps). So the results are the three launches' bit for bit, wherever each of the
three would launch its kernel; elsewhere ``norm_and_rope`` makes the three calls (their PyTorch paths included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from . import _launcher, _utils, norm as norm_mod, rope as rope_mod
from .norm import _rms_norm_rows
from .rope import _rope_rows

__all__ = ["norm_and_rope"]


@triton.jit
def _norm_rope_kernel(X, W, X_OUT, x_rows, x_seq, stride_xb, stride_xs, width, eps,
                      Q, Q_OUT, Q_COS, Q_SIN, q_rows, q_heads, q_seq,
                      stride_qb, stride_qs, stride_qh, stride_qcb, stride_qcs, stride_qsb, stride_qss,
                      K, K_OUT, K_COS, K_SIN, k_rows, k_heads, k_seq,
                      stride_kb, stride_ks, stride_kh, stride_kcb, stride_kcs, stride_ksb, stride_kss,
                      norm_programs, q_programs,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, Q_BLOCK_R: tl.constexpr,
                      K_BLOCK_R: tl.constexpr, STYLE: tl.constexpr):
    """Programs ``[0, norm_programs)``: ``_rms_norm_rows`` of the latent ``X``; the next ``q_programs``:
    ``_rope_rows`` of the query's rope part ``Q``; the rest: ``_rope_rows`` of the key's ``K``."""
    pid = tl.program_id(0)
    if pid < norm_programs:
        _rms_norm_rows(pid, X, W, X_OUT, x_rows, x_seq, stride_xb, stride_xs, width, eps, BLOCK_R, BLOCK_N)
    elif pid < norm_programs + q_programs:
        _rope_rows(pid - norm_programs, Q, Q_OUT, Q_COS, Q_SIN, q_rows, q_heads, q_seq, stride_qb, stride_qs,
                   stride_qh, stride_qcb, stride_qcs, stride_qsb, stride_qss, HALF, Q_BLOCK_R, STYLE)
    else:
        _rope_rows(pid - norm_programs - q_programs, K, K_OUT, K_COS, K_SIN, k_rows, k_heads, k_seq, stride_kb,
                   stride_ks, stride_kh, stride_kcb, stride_kcs, stride_ksb, stride_kss, HALF, K_BLOCK_R, STYLE)


def norm_and_rope(norm: nn.Module, kv_c: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), style), rms_norm(norm, kv_c), rope(k_pe, cos, sin,
    style))``: the query's rope part ``[..., H, P]`` and the key's ``[..., P]`` rotated by the tokens' tables
    ``[..., P]``, the latent ``[..., R]`` normalized by the RMSNorm module ``norm``. One launch where each of the three
    calls would launch its kernel, on one device; otherwise those three calls (module docstring)."""
    q_cos, q_sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    operands = norm_mod._kernel_operands(norm, kv_c)
    if (operands is not None and q_pe.device == kv_c.device and k_pe.device == kv_c.device
            and rope_mod._kernel_serves(q_pe, q_cos, q_sin, style) and rope_mod._kernel_serves(k_pe, cos, sin, style)):
        query = rope_mod._launch_args(q_pe, q_cos, q_sin, style)
        key = rope_mod._launch_args(k_pe, cos, sin, style) if query is not None else None
        latent = norm_mod._launch_args(kv_c, *operands) if key is not None else None  # (each allocates its output)
        programs = latent[1] + query[1] + key[1] if latent is not None else 0
        if latent is not None and _utils.grid_x_fits(programs, norm_mod.NUM_WARPS):
            if programs:
                with _utils.launch_device(kv_c.device):  # on the tensors' GPU, not the current one
                    _launcher.launch(_norm_rope_kernel, (programs,), *latent[2], *query[2], *key[2], latent[1],
                                     query[1], **latent[3], HALF=query[3]["HALF"], Q_BLOCK_R=query[3]["BLOCK_R"],
                                     K_BLOCK_R=key[3]["BLOCK_R"], STYLE=query[3]["STYLE"], num_warps=norm_mod.NUM_WARPS)
            return query[0], latent[0], key[0]
    return (rope_mod.rope(q_pe, q_cos, q_sin, style), norm_mod._norm_with(norm, kv_c, operands),
            rope_mod.rope(k_pe, cos, sin, style))
