"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), written out for the few
tensors that embedding inversion learns.

For each learned tensor θ with gradient g, at step t = 1, 2, ...:

    θ ← θ (1 − lr λ)                                  AdamW only: decoupled weight decay
    m ← β₁ m + (1 − β₁) g                             first moment
    v ← β₂ v + (1 − β₂) g²                            second moment
    θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

The operations, and their order, are those of torch.optim.Adam / AdamW on the CPU, so the
numbers are the same bit for bit (tests/test_adam.py checks it), and so is `state_dict()`: a
checkpoint resumes under either. Why not torch.optim itself: building its first optimizer
imports PyTorch's compiler stack (about 800 modules and 70 MB of memory), a large cost beside
a word of 768 numbers.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch


class AdamW:
    """AdamW over `params`; tensors whose .grad is None are skipped, as in torch.optim."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        self.params: List[torch.Tensor] = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.state: Dict[int, Dict[str, torch.Tensor]] = {}  # by position in params: step, exp_avg, exp_avg_sq

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if i not in self.state:  # the step count is a float32 tensor, as torch.optim keeps it
                self.state[i] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
            s = self.state[i]
            s["step"] += 1
            t = s["step"].item()
            if self.weight_decay != 0:
                p.mul_(1 - self.lr * self.weight_decay)
            s["exp_avg"].lerp_(g, 1 - beta1)                                   # m <- β1 m + (1 - β1) g
            s["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)        # v <- β2 v + (1 - β2) g²
            denom = (s["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(self.eps)
            p.addcdiv_(s["exp_avg"], denom, value=-self.lr / (1 - beta1 ** t))

    # torch.optim's layout, with its settings spelled out so that torch.optim reads them as ours:
    # {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{"lr": ..., "params": [0, 1, ...]}]}
    def state_dict(self) -> dict:
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                 "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                 "fused": None, "decoupled_weight_decay": True, "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Our state_dict, or torch.optim.Adam/AdamW's for the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise RuntimeError(f"optimizer state for {sum(len(g['params']) for g in groups)} tensors, "
                             f"this run learns {len(self.params)}")
        order = groups[0]["params"]  # the ids torch gave the tensors, in our order
        self.state = {}
        for i, key in enumerate(order):
            if key in state_dict["state"]:
                s, p = state_dict["state"][key], self.params[i]
                if not s["step"].reshape(()) >= 0:  # a count of steps (a negative one divides by zero)
                    raise RuntimeError(f"optimizer step count {s['step'].item()}")
                if s["exp_avg"].shape != p.shape or s["exp_avg_sq"].shape != p.shape:
                    raise RuntimeError(f"optimizer moments of shape {tuple(s['exp_avg'].shape)} for a tensor of "
                                       f"shape {tuple(p.shape)}")
                self.state[i] = {"step": s["step"].detach().float().cpu().clone().reshape(()),
                                 "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                                 "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone()}


def Adam(params: Iterable[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> AdamW:
    """Adam: AdamW without weight decay (with λ = 0 the two are the same)."""
    return AdamW(params, lr, betas, eps, weight_decay=0.0)
