"""Low-rank factorisation of linear layers by truncated SVD, plain or activation-aware.

Plain: W (out, in) ~= U_r diag(s_r) V_r^T, stored as up = U_r diag(s_r) (out, r) and down = V_r^T (r, in),
so a layer keeps r * (out + in) numbers instead of out * in (the paper's SVD argument).

Activation-aware (the idea of SVD-LLM / ASVD): what matters is the error on real inputs, ||(W - W') X||, not
||W - W'||. With the Gram matrix of the layer's inputs G = X^T X = S S^T (Cholesky), truncating the SVD of
W S is optimal for that error; the factors are up = U_r diag(s_r), down = V_r^T S^-1.
"""

from __future__ import annotations

import torch
from torch import nn

from peers.compression.options import SvdSpec

DAMPING = 1e-2  # added to the Gram diagonal, relative to its mean, so rare directions cannot blow up S^-1


class LowRankLinear(nn.Module):
    """y = up(down(x)): a linear layer held as two thin factors; the dense matrix is never formed."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # (rank, in)
        self.up = nn.Linear(rank, out_features, bias=bias)  # (out, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def saves_memory(out_features: int, in_features: int, rank: int) -> bool:
    """Whether rank-r factors hold fewer numbers than the dense matrix."""
    return rank * (out_features + in_features) < out_features * in_features


def rank_for_params(out_features: int, in_features: int, fraction: float) -> int:
    """The rank whose factors hold about `fraction` of the dense layer's parameters (at least 1)."""
    return max(1, round(fraction * out_features * in_features / (out_features + in_features)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r such that the r largest singular values hold at least `energy` of sum(s^2)."""
    squares = singular_values.double() ** 2
    cumulative = torch.cumsum(squares, 0) / squares.sum()
    reached = torch.nonzero(cumulative >= energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


def whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = gram + damping (lower-triangular Cholesky factor)."""
    gram = gram.double()
    damped = gram + DAMPING * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
    lower = torch.linalg.cholesky(damped)
    inverse = torch.linalg.solve_triangular(lower, torch.eye(len(gram), dtype=gram.dtype), upper=False)
    return lower, inverse


def choose_rank(spec: SvdSpec, singular_values: torch.Tensor, out_features: int, in_features: int) -> int:
    if spec.rank is not None:
        return min(spec.rank, len(singular_values))
    if spec.energy is not None:
        return rank_for_energy(singular_values, spec.energy)
    return rank_for_params(out_features, in_features, spec.params)


def factorise(
    weight: torch.Tensor, spec: SvdSpec, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up (out, r), down (r, in)) in float32, or None when the factors would not save memory."""
    out_features, in_features = weight.shape
    matrix = weight.double()
    if spec.method == "activation-aware":
        if gram is None:
            raise ValueError("activation-aware SVD needs the Gram matrix of the layer's inputs")
        lower, inverse = whitening(gram)
        matrix = matrix @ lower  # W S
    u, s, vh = (t.double() for t in torch.linalg.svd(matrix.float(), full_matrices=False))  # float32: 3x faster
    rank = choose_rank(spec, s, out_features, in_features)
    if not saves_memory(out_features, in_features, rank):
        return None
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if spec.method == "activation-aware":
        down = down @ inverse  # V^T S^-1
    return up.float().contiguous(), down.float().contiguous()


def linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the dense 2-D weights in a block's state ("self_attn.q_proj", "mlp.down_proj", ...)."""
    return sorted(key.removesuffix(".weight") for key, value in state.items()
                  if key.endswith(".weight") and value.dim() == 2)


def factorise_block(
    state: dict[str, torch.Tensor], spec: SvdSpec, grams: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A block's state with each linear weight "x.weight" replaced by "x.up.weight" and "x.down.weight"
    where that saves memory; norms, biases and layers that would not shrink are kept as they were."""
    result = dict(state)
    for name in linear_names(state):
        gram = grams.get(name) if grams else None
        factors = factorise(state[f"{name}.weight"], spec, gram)
        if factors is None:
            continue
        up, down = factors
        del result[f"{name}.weight"]
        result[f"{name}.up.weight"], result[f"{name}.down.weight"] = up, down
        if f"{name}.bias" in result:
            result[f"{name}.up.bias"] = result.pop(f"{name}.bias")
    return result


def shape_for_state(layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap each nn.Linear of `layer` whose weight `state` holds as factors for a LowRankLinear of the
    factors' rank (built on the meta device; weights are assigned later)."""
    for name, module in list(layer.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.down.weight" not in state:
            continue
        rank = state[f"{name}.down.weight"].shape[0]
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        with torch.device("meta"):
            low_rank = LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None)
        setattr(parent, child, low_rank)
