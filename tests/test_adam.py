"""inversion/adam.py: the same numbers as torch.optim.Adam/AdamW on the CPU, bit for bit, and
the same state_dict, so a checkpoint resumes under either."""
import copy

import pytest
import torch

from inversion.adam import Adam, AdamW


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 8, generator=g).requires_grad_(True), torch.randn(5, generator=g).requires_grad_(True)]


def run(optimizer, ps, steps, seed=1, start=0):
    """Random gradients; the second tensor gets none on every third step (skipped, as an unused token)."""
    g = torch.Generator().manual_seed(seed)
    for step in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        grads = [torch.randn(p.shape, generator=g) * 10 ** (step % 4 - 2) for p in ps]
        ps[0].grad = grads[0]
        if step % 3:
            ps[1].grad = grads[1]
        optimizer.step()


@pytest.mark.parametrize("ours, theirs", [
    (lambda ps: AdamW(ps, lr=0.04), lambda ps: torch.optim.AdamW(ps, lr=0.04)),
    (lambda ps: AdamW(ps, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
     lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    (lambda ps: Adam(ps, lr=5e-3), lambda ps: torch.optim.Adam(ps, lr=5e-3)),
])
def test_same_numbers_as_torch_optim(ours, theirs):
    a, b = params(), params()
    opt_a, opt_b = ours(a), theirs(b)
    run(opt_a, a, 30)
    run(opt_b, b, 30)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() == {0, 1}
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        assert sa[i]["step"].dtype == sb[i]["step"].dtype
    assert sa[0]["step"].item() == 30 and sa[1]["step"].item() == 20  # skipped without a gradient


def test_a_checkpoint_resumes_under_either():
    a, b = params(), params()
    first = torch.optim.AdamW(a, lr=0.04)
    run(first, a, 10)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    ours = AdamW(b, lr=0.04)
    ours.load_state_dict(first.state_dict())   # torch.optim's state into ours
    run(first, a, 10, start=10)
    run(ours, b, 10, start=10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    back = torch.optim.AdamW(a, lr=0.04)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # and ours into torch.optim's (a copy, as torch.save makes)
    run(back, a, 5, start=20)
    run(ours, b, 5, start=20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_state_for_other_tensors_is_refused():
    opt = AdamW(params(), lr=0.1)
    with pytest.raises(RuntimeError, match="optimizer state for 1 tensors, this run learns 2"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
