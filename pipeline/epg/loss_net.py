"""The EPG loss network L_phi (Houthooft et al. 2018), applied functionally from one flat vector phi.

Per time step the loss sees ``[observation, action (one-hot if discrete), reward, done, policy output
(probabilities, or mean and log-std), memory units]``. Temporal convolutions over the whole buffer of
the last N steps, averaged over time, give a context vector that is tiled to every step; a small MLP on
``[step features, context]`` gives a scalar loss per step, and the minibatch loss is their mean.

Evolution strategies perturb phi as one flat vector, so the module here is only a *template*:
``apply_loss_net(template, layout, phi, ...)`` runs it with parameters sliced out of phi through
``torch.func.functional_call``, which ``torch.func.vmap`` batches over population members. That is the
reference; the inner loop runs :class:`MemberLosses`, the same function as plain batched ops on
per-member weight stacks (tested equal in value and gradient), which is cheaper per update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..config import LossNetConfig

LEAKY_SLOPE = 0.2


def loss_input_dim(obs_dim: int, action_features: int, policy_features: int, memory_units: int) -> int:
    """Width D of one step's loss input: obs, action, reward, done, policy output, memory."""
    return obs_dim + action_features + 2 + policy_features + memory_units


class LossNetwork(nn.Module):
    """Template module; its own parameters only serve as a shape and an initialisation.

    As in the official code: Conv1d -> LeakyReLU -> Conv1d -> LeakyReLU, mean over time, Linear -> the
    context; head Linear(D + context) -> LeakyReLU -> Linear -> one loss per step.
    """

    def __init__(self, input_dim: int, config: LossNetConfig):
        super().__init__()
        layers: list[nn.Module] = []
        channels = input_dim
        for out, kernel, stride in zip(
            config.conv_channels, config.conv_kernels, config.conv_strides, strict=True
        ):
            layers += [nn.Conv1d(channels, out, kernel, stride=stride), nn.LeakyReLU(LEAKY_SLOPE)]
            channels = out
        self.temporal = nn.Sequential(*layers)
        self.summary = nn.Linear(channels, channels)
        self.head = nn.Sequential(
            nn.Linear(input_dim + channels, config.hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(config.hidden, 1),
        )
        self.input_dim = input_dim
        self.context_dim = channels

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Two uses, so the context can be computed once and reused:

        * ``forward(buffer)``: buffer [N, D] of time-ordered loss inputs -> context [C];
        * ``forward(steps, context)``: steps [n, D] of the minibatch -> losses [n].
        """
        if context is None:
            return self.summary(self.temporal(x.transpose(0, 1).unsqueeze(0)).mean(dim=-1)).squeeze(0)
        joint = torch.cat([x, context.expand(x.shape[0], -1)], dim=-1)
        return self.head(joint).squeeze(-1)


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter of a module lives inside one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> ParamLayout:
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def size(self) -> int:
        return sum(int(torch.Size(shape).numel()) for shape in self.shapes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into ``flat`` ([size], or [P, size] for stacks [P, *shape]); works under vmap."""
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            count = int(torch.Size(shape).numel())
            params[name] = flat[..., offset : offset + count].reshape(*flat.shape[:-1], *shape)
            offset += count
        return params

    def flatten(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def initial_phi(input_dim: int, config: LossNetConfig, seed: int) -> torch.Tensor:
    """PyTorch's default initialisation of the template, drawn from ``seed``, as a flat vector."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = LossNetwork(input_dim, config)
    return ParamLayout.of(module).flatten(module)


def loss_context(template: LossNetwork, layout: ParamLayout, phi: torch.Tensor, buffer: torch.Tensor):
    """The context [C] of one lifetime's buffer [N, D] under the loss with flat parameters ``phi``."""
    return functional_call(template, layout.unflatten(phi), (buffer,))


def step_losses(
    template: LossNetwork, layout: ParamLayout, phi: torch.Tensor, steps: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Per-step losses [n] of one lifetime's minibatch steps [n, D] given its context [C]."""
    return functional_call(template, layout.unflatten(phi), (steps, context))


def apply_loss_net(
    template: LossNetwork, layout: ParamLayout, phi: torch.Tensor, buffer: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """Per-step losses [n] of one lifetime under the loss with flat parameters ``phi``."""
    return step_losses(template, layout, phi, steps, loss_context(template, layout, phi, buffer))


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(x, LEAKY_SLOPE)


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, bias: torch.Tensor | None = None):
    """Each member's own Conv1d in one call: x [W, P * C_in, T], weight [P, C_out, C_in, k] ->
    [W, P * C_out, T']: a grouped convolution with one group per member."""
    members, out_channels = weight.shape[:2]
    return torch.nn.functional.conv1d(
        x,
        weight.reshape(members * out_channels, *weight.shape[2:]),
        None if bias is None else bias.reshape(-1),
        stride=stride,
        groups=members,
    )


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """[P, W, T, C] -> [W, P * C, T], the layout of :func:`_grouped_conv`."""
    members, workers, steps, channels = x.shape
    return x.permute(1, 0, 3, 2).reshape(workers, members * channels, steps)


class MemberLosses:
    """The loss networks of P members (``phi`` [P, size]) on their W lifetimes each, as plain batched
    tensor ops: the same function as ``vmap`` of :class:`LossNetwork` over members, computed cheaper.

    The loss input of a step is ``[data, policy output, memory]``, where *data* (observation, action,
    reward, done) comes from the buffer and does not depend on the inner-loop parameters. The first
    convolution and the head's first layer are linear in the input, so they split over these column
    groups: the data's share is computed once per update (:meth:`data_terms`) and reused by every
    minibatch, and only the policy-dependent columns are added per minibatch, with gradient. Memory
    units are constant over time, so their share of a convolution is ``(sum_k W[:, :, k]) m``.
    """

    def __init__(self, template: LossNetwork, phi: torch.Tensor, data_dim: int, memory_dim: int):
        if phi.dim() != 2:
            raise ValueError(f"phi must be [members, size], got shape {tuple(phi.shape)}")
        params = ParamLayout.of(template).unflatten(phi)
        convs = [module for module in template.temporal if isinstance(module, nn.Conv1d)]
        self.strides = [conv.stride[0] for conv in convs]
        self.conv_weights = [params[f"temporal.{2 * i}.weight"] for i in range(len(convs))]
        self.conv_biases = [params[f"temporal.{2 * i}.bias"] for i in range(len(convs))]
        self.summary = (params["summary.weight"].transpose(1, 2), params["summary.bias"].unsqueeze(1))
        head_in = params["head.0.weight"].transpose(1, 2)  # [P, D + C, hidden]
        policy_end = template.input_dim - memory_dim
        self.data_dim, self.policy_end = data_dim, policy_end
        self.head_data, self.head_policy = head_in[:, :data_dim], head_in[:, data_dim:policy_end]
        self.head_memory, self.head_context = (
            head_in[:, policy_end : template.input_dim],
            head_in[:, template.input_dim :],
        )
        self.head_bias = params["head.0.bias"]
        self.head_out = (params["head.2.weight"].transpose(1, 2), params["head.2.bias"])
        first = self.conv_weights[0]
        self.first_memory = first[:, :, policy_end:].sum(-1)  # [P, C1, U]: a constant input's share

    def data_terms(self, data: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The data columns' share of the first convolution over the whole buffer, [W, P * C1, T1]
        (bias included), and of the head's first layer at buffer steps ``rows``, [P, W, rows, hidden].
        ``data`` [P, W, N, data_dim]."""
        conv = _grouped_conv(
            _channels_first(data),
            self.conv_weights[0][:, :, : self.data_dim],
            self.strides[0],
            self.conv_biases[0],
        )
        steps = data[:, :, rows]
        members, workers, count, _ = steps.shape
        head = torch.baddbmm(
            self.head_bias.unsqueeze(1), steps.reshape(members, workers * count, -1), self.head_data
        )
        return conv, head.reshape(members, workers, count, -1)

    def context(
        self, data_conv: torch.Tensor, policy: torch.Tensor, memory: torch.Tensor | None
    ) -> torch.Tensor:
        """Context [P, W, C] from the data's share ``data_conv`` (:meth:`data_terms`), the policy outputs
        at every buffer step ``policy`` [P, W, N, H] and the memory units [P, W, U] (or None)."""
        members, workers = policy.shape[:2]
        x = data_conv + _grouped_conv(
            _channels_first(policy),
            self.conv_weights[0][:, :, self.data_dim : self.policy_end],
            self.strides[0],
        )
        if memory is not None:
            x = x + torch.bmm(memory, self.first_memory.transpose(1, 2)).transpose(0, 1).reshape(
                workers, -1, 1
            )
        x = _leaky(x)
        for weight, bias, stride in zip(
            self.conv_weights[1:], self.conv_biases[1:], self.strides[1:], strict=True
        ):
            x = _leaky(_grouped_conv(x, weight, stride, bias))
        pooled = x.mean(-1).reshape(workers, members, -1).transpose(0, 1)  # [P, W, C]
        return torch.baddbmm(self.summary[1], pooled, self.summary[0])

    def step_losses(
        self,
        data_head: torch.Tensor,
        policy: torch.Tensor,
        memory: torch.Tensor | None,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """Losses [P, W, n] of n steps: their data share ``data_head`` [P, W, n, hidden], policy outputs
        [P, W, n, H], the memory units [P, W, U] (or None) and the context [P, W, C]."""
        members, workers, count, _ = policy.shape
        constant = torch.bmm(context, self.head_context)  # [P, W, hidden]
        if memory is not None:
            constant = constant + torch.bmm(memory, self.head_memory)
        varying = torch.bmm(policy.reshape(members, workers * count, -1), self.head_policy)
        hidden = _leaky(data_head + varying.reshape(members, workers, count, -1) + constant.unsqueeze(2))
        out = torch.baddbmm(
            self.head_out[1].unsqueeze(1), hidden.reshape(members, workers * count, -1), self.head_out[0]
        )
        return out.reshape(members, workers, count)
