r"""The neural networks inside the flow layers, and how their options are resolved.

- :func:`mlp`: the conditioner of the coupling layers (:class:`~.coupling.AffineCoupling`,
  :class:`~.spline.SplineCoupling`).
- :class:`MADE`: the masked network of the autoregressive layers (:mod:`.autoregressive`).
- :class:`ODENet` (of :class:`ConcatSquash` layers): the vector field of :class:`~.continuous.ContinuousFlow`;
  :class:`FieldTrace` its value and Jacobian trace by forward-mode tangents in plain tensor ops.
- :data:`ACTIVATIONS` / :func:`activation_factory`: activations by name; :func:`made_hidden_dims`: MADE's
  hidden widths; :func:`soft_bound`: the smooth bound on a log-scale.

Every network's last layer can start at zero, so a layer built on it starts as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from pyro.nn.auto_reg_nn import create_mask
from torch import Tensor, nn

from ..validate import check_activation, check_choice, check_hidden_dims

__all__ = [
    "ACTIVATIONS",
    "MADE",
    "PACK_LIMIT",
    "SMOOTH_ACTIVATIONS",
    "ConcatSquash",
    "FieldTrace",
    "ODENet",
    "activation_factory",
    "forward_mode_trace",
    "made_hidden_dims",
    "mlp",
    "soft_bound",
]

#: Activations by name, for the ``activation`` option of every layer with a network.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}
#: The smooth ones, for a CNF's field: the adaptive solver and the trace need ``f`` differentiable.
SMOOTH_ACTIVATIONS = {name: ACTIVATIONS[name] for name in ("tanh", "softplus", "silu")}

#: Most numbers packed into one parameter tensor of a :class:`MADE` (1 MiB of float32).
PACK_LIMIT = 1 << 18


def activation_factory(
    activation: str | Callable[[], nn.Module], name: str = "activation", allowed: dict | None = None
) -> Callable[[], nn.Module]:
    """A module factory from a name in ``allowed`` (default :data:`ACTIVATIONS`: ``"relu"``, ``"tanh"``, …)
    or a class (``nn.ReLU``)."""
    return check_activation(activation, ACTIVATIONS if allowed is None else allowed, name)


def soft_bound(s: Tensor, bound: float) -> Tensor:
    """``a·tanh(s/a)``: the identity near 0, smooth, and inside ``(−a, a)`` (``a = bound``)."""
    return bound * torch.tanh(s / bound)


def made_hidden_dims(hidden_dims: Iterable[int] | None, dim: int) -> tuple[int, ...]:
    """MADE's hidden widths: ``(3d + 1,)`` by default (Pyro's ``affine_autoregressive``), each ``>= d``.

    MADE connects every input only with at least ``d`` units per layer (one per degree); about three per
    degree leaves room for nonlinearity.
    """
    default = (3 * dim + 1,)
    hidden = default if hidden_dims is None else hidden_dims
    return check_hidden_dims(hidden, minimum=dim, example=default, note=f"MADE needs >= dim={dim} units per layer")


class _Constant(nn.Module):
    """The conditioner of a coupling with nothing to condition on: learned outputs, starting at 0."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out = nn.Parameter(torch.zeros(out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.out.expand(*h.shape[:-1], -1)


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str | Callable[[], nn.Module]) -> nn.Module:
    """``Linear → act → … → Linear``: ``(..., in_dim) → (..., out_dim)``, the last layer zero-initialized.

    Outputs start at 0, so the layer it conditions starts as the identity. ``in_dim = 0`` (nothing to
    condition on): learned constant outputs.
    """
    activation = activation_factory(activation)
    if in_dim == 0:
        return _Constant(out_dim)
    dims = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), activation()]
    last = nn.Linear(dims[-1], out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class MADE(nn.Module):
    r"""``x ↦ (h_1, …, h_P)``, each shaped like ``x``, with ``h_p[i]`` a function of ``x[order[:rank(i)]]`` only.

    A multilayer perceptron ``x → hidden_dims → P·d`` whose weights are
    multiplied by fixed 0/1 masks built from degrees (Pyro's ``create_mask``,
    so the masks are those of :class:`pyro.nn.AutoRegressiveNN` with the same
    ``order``). With ``context_dim > 0`` the context is prepended to the input
    and feeds every hidden unit (Paige & Wood 2016).

    Shapes: ``x (..., d)``, ``context (..., context_dim)`` → ``num_outputs`` tensors ``(..., d)``.

    The layers' weights and biases are packed into as few flat parameters as
    hold at most :data:`PACK_LIMIT` numbers each, viewed layer by layer in
    ``forward``: Pyro's optimizers keep one torch optimizer per parameter
    tensor, and that bookkeeping costs more than a small network's math;
    above the limit each tensor stands alone, as an optimizer's passes over
    one tensor larger than the cache cost more than over several that fit
    (measurements: ``docs/benchmarks.md``, speed). Initialization is that of
    :class:`torch.nn.Linear`, ``U(−1/√fan_in, 1/√fan_in)``.

    Reference: Germain, Gregor, Murray, Larochelle, "MADE: Masked Autoencoder
    for Distribution Estimation", ICML 2015.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        context_dim: int = 0,
        *,
        order: Tensor,
        num_outputs: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.dim, self.context_dim, self.num_outputs = dim, context_dim, num_outputs
        self.register_buffer("permutation", torch.as_tensor(order, dtype=torch.long))
        masks, _ = create_mask(dim, context_dim, list(hidden_dims), self.permutation, num_outputs)
        widths = [dim + context_dim, *hidden_dims, num_outputs * dim]
        self.shapes = list(zip(widths[1:], widths[:-1]))  # (out, in) of each layer
        self._mask_names = [f"mask{k}" for k in range(len(masks))]
        for name, mask in zip(self._mask_names, masks):
            self.register_buffer(name, mask)
        self.groups = _pack([n for o, i in self.shapes for n in (o * i, o)], PACK_LIMIT)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(sum(g))) for g in self.groups)
        self.activation = activation_factory(activation)()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for (w, b), (_, fan_in) in zip(self._layers(), self.shapes):
                bound = 1 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def zero_output_(self) -> MADE:
        """Set the last layer's weights and biases to zero, so every output starts at 0; returns ``self``."""
        with torch.no_grad():
            for p in self._layers()[-1]:
                p.zero_()
        return self

    def _layers(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) views of each layer into the packed parameters."""
        # one split, not a slice per tensor: a slice's backward allocates a zero tensor the size of the whole parameter
        parts = [
            part for p, sizes in zip(self.weights, self.groups) for part in (p.split(sizes) if len(sizes) > 1 else (p,))
        ]
        return [(w.view(o, i), b) for (o, i), w, b in zip(self.shapes, parts[::2], parts[1::2])]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.context_dim:
            x = torch.cat([context.expand(x.shape[:-1] + context.shape[-1:]), x], dim=-1)
        layers = self._layers()
        h = x
        for k, ((w, b), name) in enumerate(zip(layers, self._mask_names)):
            h = F.linear(h, w * self._buffers[name], b)
            if k < len(layers) - 1:
                h = self.activation(h)
        return h.unflatten(-1, (self.num_outputs, self.dim)).unbind(-2)


def _pack(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive ``sizes`` in groups whose sums stay within ``limit`` (a size above it alone)."""
    groups: list[list[int]] = [[]]
    for n in sizes:
        if groups[-1] and sum(groups[-1]) + n > limit:
            groups.append([])
        groups[-1].append(n)
    return groups


class ConcatSquash(nn.Module):
    r"""``h ↦ (W h + b) ⊙ σ(A s + a) + B s`` with ``s = (t, context)`` (FFJORD's ConcatSquashLinear).

    Shapes: ``h (..., d_in)``, ``s (..., d_s)`` → ``(..., d_out)``.
    """

    def __init__(self, d_in: int, d_out: int, d_s: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(d_s, d_out)
        self.shift = nn.Linear(d_s, d_out, bias=False)

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        return self.linear(h) * torch.sigmoid(self.gate(s)) + self.shift(s)


class ODENet(nn.Module):
    r"""The vector field ``f(z, t, c)``: an MLP of :class:`ConcatSquash` layers, ``z (..., d) → (..., d)``.

    Time (and the context ``c``) gate and shift every layer rather than being
    one more input column, so the field can change character along ``t`` at a
    cost of ``O(width)`` per layer; this is FFJORD's default layer. The last
    layer starts at zero, so ``f ≡ 0`` and the flow starts as the identity.
    ``activation``: a name in :data:`SMOOTH_ACTIVATIONS` (default ``"tanh"``, FFJORD's).

    Reference: Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for
    Scalable Reversible Generative Models", ICLR 2019.
    """

    def __init__(self, dim: int, hidden_dims: Iterable[int], context_dim: int = 0, activation: str = "tanh"):
        super().__init__()
        widths = (dim, *hidden_dims, dim)
        self.layers = nn.ModuleList(ConcatSquash(a, b, 1 + context_dim) for a, b in zip(widths[:-1], widths[1:]))
        # names only: FieldTrace needs σ' in closed form
        self.activation = SMOOTH_ACTIVATIONS[check_choice(activation, SMOOTH_ACTIVATIONS, "activation")]()
        last = self.layers[-1]
        for p in (last.linear.weight, last.linear.bias, last.shift.weight):
            nn.init.zeros_(p)

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        s = t.to(z).expand(*z.shape[:-1], 1)
        if context is not None:
            s = torch.cat([s, context], -1)
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, s))
        return self.layers[-1](h, s)


def _activation_slope(activation: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """``σ'(pre)`` of a :data:`SMOOTH_ACTIVATIONS` module, given ``out = σ(pre)``."""
    if isinstance(activation, nn.Tanh):
        return 1 - out * out
    if isinstance(activation, nn.Softplus):
        return torch.sigmoid(activation.beta * pre)
    if isinstance(activation, nn.SiLU):
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    raise TypeError(f"no closed-form slope for activation {type(activation).__name__}")


class FieldTrace:
    r"""``(t, z) ↦ (f(z, t, c), Σₘ Dₘᵀ (∂f/∂z) Dₘ)`` for one solve of an :class:`ODENet` with context ``c``.

    The tangents ``(∂h/∂z) D`` are pushed through the layers by hand beside ``h``: plain tensor ops, no
    nested autograd, so a training step back-propagates through a first-order graph (not through
    vector-Jacobian products recorded with ``create_graph``), and ``torch.jit.trace`` can record it.
    ``D = I`` (``eps`` None, ``d`` tangents) gives the exact trace ``tr ∂f/∂z``; ``D = ε`` (one tangent)
    Hutchinson's ``εᵀ (∂f/∂z) ε``. Per layer, with ``g = σ(A s + a)`` and ``s = (t, c)``::

        pre = (W h + b) ⊙ g + B s,     h' = act(pre),     T' = act'(pre) ⊙ g ⊙ (W T)

    (the last layer without ``act``). ``A s + a`` and ``B s`` of every layer are affine in ``t`` with ``c``
    fixed through a solve: their ``c`` part is computed once here, and each evaluation adds ``t`` times
    one column (at a batch of 8 the field's cost is its number of ops, not their size:
    ``docs/benchmarks.md``, speed).

    Shapes: ``z (n, d)``, ``context (n, context_dim)`` or None, ``eps (n, d)`` or None.
    """

    def __init__(self, net: ODENet, context: Tensor | None, eps: Tensor | None):
        layers = net.layers
        self.weights = [layer.linear.weight for layer in layers]
        self.biases = [layer.linear.bias for layer in layers]
        self.widths = [layer.linear.out_features for layer in layers]
        self.half = sum(self.widths)  # u = (gates' pre-activations, shifts)
        self.activation = net.activation
        gate_bias = torch.cat([layer.gate.bias for layer in layers])
        rows = torch.cat([layer.gate.weight for layer in layers] + [layer.shift.weight for layer in layers])
        fixed = torch.cat([gate_bias, torch.zeros_like(gate_bias)])
        self.per_time = rows[:, 0]  # s = (t, c): column 0 multiplies t
        self.fixed = fixed if context is None else torch.addmm(fixed, context, rows[:, 1:].T)
        if eps is None:
            d, like = layers[0].linear.in_features, self.per_time
            self.directions = torch.eye(d, dtype=like.dtype, device=like.device)  # D = I: (d, d)
        else:
            self.directions = eps.unsqueeze(-2)  # D = ε: (n, 1, d)

    def __call__(self, t: Tensor | float, z: Tensor) -> tuple[Tensor, Tensor]:
        u = self.fixed + t * self.per_time
        gates = torch.sigmoid(u[..., : self.half]).split(self.widths, -1)
        shifts = u[..., self.half :].split(self.widths, -1)
        h, tangent = z, self.directions  # (n, d), (…, m, d)
        last = len(self.weights) - 1
        for i, (w, b, g, shift) in enumerate(zip(self.weights, self.biases, gates, shifts)):
            pre = torch.addcmul(shift, F.linear(h, w, b), g)
            if i < last:
                h = self.activation(pre)
                g = g * _activation_slope(self.activation, pre, h)
            tangent = F.linear(tangent, w) * g.unsqueeze(-2)
        return pre, (tangent * self.directions).sum((-2, -1))


def forward_mode_trace(
    net: ODENet, t: Tensor, z: Tensor, context: Tensor | None, eps: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(f, tr ∂f/∂z)`` (``eps`` None) or ``(f, εᵀ (∂f/∂z) ε)``: one evaluation of :class:`FieldTrace`."""
    return FieldTrace(net, context, eps)(t, z)
