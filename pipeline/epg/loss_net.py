"""The EPG loss network L_phi (Houthooft et al. 2018), applied functionally from one flat vector phi.

Per time step the loss sees ``[observation, action (one-hot if discrete), reward, done, policy output
(probabilities, or mean and log-std), memory units]``. Temporal convolutions over the whole buffer of
the last N steps, averaged over time, give a context vector that is tiled to every step; a small MLP on
``[step features, context]`` gives a scalar loss per step, and the minibatch loss is their mean.

Evolution strategies perturb phi as one flat vector, so the module here is only a *template*:
``apply_loss_net(template, layout, phi, ...)`` runs it with parameters sliced out of phi through
``torch.func.functional_call``, which ``torch.func.vmap`` batches over population members.
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
        """Views into ``flat`` (shape [size]); works under vmap."""
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            count = int(torch.Size(shape).numel())
            params[name] = flat[offset : offset + count].reshape(shape)
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
