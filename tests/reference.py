"""Independent reference computations shared by the tests."""

import torch


def reference_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    moved = weight.movedim(dim, -1).float()  # bf16 -> fp32 is exact, so magnitudes compare the same
    flat = moved.reshape(-1, m).tolist()
    keep = []
    for group in flat:
        order = sorted(range(m), key=lambda i: (-abs(group[i]), i))
        kept = set(order[:n])
        keep.append([i in kept for i in range(m)])
    return torch.tensor(keep, dtype=torch.bool).reshape(moved.shape).movedim(-1, dim)
