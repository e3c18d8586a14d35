"""MADE: autoregressive structure by brute-force Jacobian, and equality with Pyro's AutoRegressiveNN."""

import pytest
import torch
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN

from vi_flows.transforms.made import MADE


@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("context_dim", [0, 3])
def test_output_i_depends_only_on_inputs_before_i_in_order(dim, context_dim):
    torch.manual_seed(0)
    order = torch.randperm(dim)
    # tanh, not ReLU: a dead ReLU unit could zero an allowed derivative by chance
    made = MADE(dim, [3 * dim + 1, 2 * dim + 1], context_dim, order=order, activation=torch.nn.Tanh).double()
    x, c = torch.randn(dim, dtype=torch.float64), torch.randn(context_dim, dtype=torch.float64)
    rank = torch.argsort(order)
    allowed = rank.unsqueeze(-1) > rank.unsqueeze(0)  # [i, j]: output i may read input j
    for p in range(2):
        jac = torch.autograd.functional.jacobian(lambda x, p=p: made(x, c if context_dim else None)[p], x)
        assert torch.all(jac[~allowed] == 0)
        # and MADE is as connected as its masks allow: every allowed entry is nonzero for random weights
        assert torch.all(jac[allowed] != 0)
        if context_dim:
            jac_c = torch.autograd.functional.jacobian(lambda c, p=p: made(x, c)[p], c)
            assert torch.all(jac_c != 0)


@pytest.mark.parametrize("context_dim", [0, 2])
def test_same_function_as_pyro_autoregressive_nn_with_the_same_weights(context_dim):
    torch.manual_seed(1)
    dim, hidden, order = 4, [9, 7], torch.tensor([2, 0, 3, 1])
    made = MADE(dim, hidden, context_dim, order=order)
    if context_dim:
        pyro_net = ConditionalAutoRegressiveNN(dim, context_dim, hidden, param_dims=[1, 1], permutation=order)
    else:
        pyro_net = AutoRegressiveNN(dim, hidden, param_dims=[1, 1], permutation=order)
    with torch.no_grad():
        for k, ((w, b), layer) in enumerate(zip(made._layers(), pyro_net.layers)):
            assert torch.equal(getattr(made, f"mask{k}"), layer.mask)
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    x, c = torch.randn(6, dim), torch.randn(6, context_dim)
    ours = made(x, c) if context_dim else made(x)
    theirs = pyro_net(x, c) if context_dim else pyro_net(x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_small_networks_are_one_tensor_and_gradients_reach_every_layer():
    made = MADE(3, [10, 10], 2, order=torch.arange(3))
    assert [name for name, _ in made.named_parameters()] == ["weights.0"]
    m, s = made(torch.randn(5, 3), torch.randn(5, 2))
    (m.sum() + s.sum()).backward()
    grads = made.weights[0].grad
    offset = 0
    for o, i in made.shapes:  # every layer's slice of the flat gradient has nonzero entries
        assert grads[offset : offset + o * i + o].abs().sum() > 0
        offset += o * i + o


def test_large_layers_get_tensors_of_their_own():
    from vi_flows.transforms import made as made_module

    limit = made_module.PACK_LIMIT
    dim = 200  # 3d + 1 = 601 hidden: the layers hold 120,200 + 601 and 240,400 + 400 numbers
    made = MADE(dim, [3 * dim + 1], order=torch.arange(dim))
    sizes = [p.numel() for p in made.parameters()]
    assert sum(sizes) == sum(o * i + o for o, i in made.shapes)
    assert all(n <= limit for n in sizes) and len(sizes) == 2  # [w0 b0] and [w1 b1]: both pairs would exceed it
    assert made_module._pack([limit + 1, 5, 5, limit], limit) == [[limit + 1], [5, 5], [limit]]


def test_zero_output_zeroes_every_output_and_only_the_last_layer():
    made = MADE(3, [10], 2, order=torch.arange(3))
    first = [t.detach().clone() for t in made._layers()[0]]
    made.zero_output_()
    for out in made(torch.randn(4, 3), torch.randn(4, 2)):
        assert torch.equal(out, torch.zeros(4, 3))
    for before, after in zip(first, made._layers()[0]):
        assert torch.equal(before, after)
