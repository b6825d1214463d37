"""DIKI's residual prefix attention in the blocks of a frozen open_clip CLIP (Tang et al., ECCV 2024).

In each of the first ``depth`` residual blocks of a tower, task ``t`` owns ``L`` prefix keys
``P_k`` and values ``P_v`` (each ``L x d``, in the space *after* ``in_proj``: they are never
projected). With ``q, K, V`` from the block's frozen ``in_proj`` and per head ``h`` (width
``d_h = d / H``)::

    A_h = softmax(q_h K_h^T / sqrt(d_h) + M) V_h        # the frozen attention, M = causal mask (text)
    R_h = softmax(q_h P_{k,h}^T / sqrt(d_h)) P_{v,h}     # own softmax over the L prefix keys, no mask
    out = out_proj(concat_h(A_h + w * R_h))

``P_k ~ U(-1, 1)`` and ``P_v = 0`` at initialisation, so an untrained (or ``w = 0``) model is the
zero-shot CLIP, bit for bit.

No fork of open_clip (as :mod:`zscl.moe.adapters`): a forward hook on each chosen block's
``nn.MultiheadAttention`` adds ``w * R @ W_o^T`` to the frozen attention's output. Because
``out_proj`` is affine, ``out_proj(A + w R) = out_proj(A) + w R W_o^T``, so this is the formula above;
the frozen branch stays torch's own attention call (masks and fast paths as open_clip has them),
at the cost of recomputing ``q`` (one ``d x d`` matmul per prefixed block). The CLIP's
state-dict keys are unchanged: the prefixes live in :class:`DIKIPrefixes`, a separate module.

Routing (:meth:`DIKIPrefixes.routing`): per tower ``None`` (prefixes off, the plain CLIP) or a
:class:`Route` ``(task, weight)``: ``task`` an ``int`` or a LongTensor ``[B]`` (per image),
``weight`` a ``float`` or a tensor ``[B]`` (per image). DIKI gives the image tower per-image
weights and the text tower one scalar (the batch mean, :mod:`zscl.diki.calibration`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from zscl.moe.adapters import adapted_blocks

TOWERS = ("image", "text")


class Route(NamedTuple):
    """Which task's prefixes a tower uses and how strongly (``w`` in the module docstring)."""

    task: Union[int, torch.Tensor]  # int, or LongTensor [B]: one task per sample
    weight: Union[float, torch.Tensor] = 1.0  # float, or tensor [B]: one weight per sample


@dataclass
class PrefixConfig:
    """Hyperparameters of the prefixes (defaults: the reference's MTIL configs)."""

    depth_image: int = 8  # prefixed blocks of the image tower (the first ones; capped at its depth)
    depth_text: int = 8  # prefixed blocks of the text tower
    length: int = 8  # L, prefix tokens per task and block
    key_init: float = 1.0  # keys ~ U(-key_init, key_init)


class BlockPrefixes(nn.Module):
    """The prefix keys and values of one attention block: ``keys[t]``, ``values[t]``, each ``[L, d]``."""

    def __init__(self, width: int, length: int, num_tasks: int, key_init: float = 1.0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        # One parameter per task (not one [T, L, d] tensor): a task's prefixes can be trained,
        # frozen or handed to an optimizer on their own.
        self.keys = nn.ParameterList(
            nn.Parameter(torch.empty(length, width, device=device).uniform_(-key_init, key_init))
            for _ in range(num_tasks))
        self.values = nn.ParameterList(nn.Parameter(torch.zeros(length, width, device=device)) for _ in range(num_tasks))

    def gather(self, task: Union[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_k, P_v)``, each ``[1, L, d]`` for an int task or ``[B, L, d]`` for per-sample tasks."""
        if isinstance(task, int):
            return self.keys[task][None], self.values[task][None]
        # a one-hot matmul instead of indexing: its backward is deterministic (see zscl.moe.adapters._select)
        onehot = F.one_hot(task, len(self.keys))
        return tuple(torch.einsum("bt,tld->bld", onehot.to(ps[0].dtype), torch.stack(list(ps)))
                     for ps in (self.keys, self.values))


def prefix_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """``concat_h softmax(q_h P_{k,h}^T / sqrt(d_h)) P_{v,h}`` for batch-first ``q`` ``[B, N, d]``.

    ``keys``/``values`` are ``[1 or B, L, d]``, split into heads like ``q``; no mask, so every
    token (text tokens included) sees all ``L`` prefixes.
    """
    b, n, d = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # [B', M, d] -> [B', H, M, d_h]
        return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)

    k, v = split(keys.to(q.dtype)), split(values.to(q.dtype))
    out = F.scaled_dot_product_attention(split(q), k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
    return out.transpose(1, 2).reshape(b, n, d)


def _per_sample(weight: Union[float, torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
    """The weight as a ``[B, 1, 1]`` (or ``[1, 1, 1]``) tensor broadcastable over batch-first tokens."""
    w = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    if w.dim() == 0:
        return w.view(1, 1, 1)
    if w.shape != (batch,):
        raise ValueError(f"per-sample prefix weights of shape {tuple(w.shape)}, but the batch has {batch} samples")
    return w.view(batch, 1, 1)


def prefixed_blocks(clip: nn.Module, cfg: PrefixConfig) -> list[tuple[str, str, nn.Module]]:
    """``(tower, name, block)`` of the first ``depth_image`` / ``depth_text`` blocks of each tower."""
    try:
        found = adapted_blocks(clip, TOWERS)
    except ValueError:
        found = []
    depth = {"image": cfg.depth_image, "text": cfg.depth_text}
    chosen, seen = [], {"image": 0, "text": 0}
    for name, block, _ in found:
        tower = "image" if name.startswith("visual") else "text"  # the tower rule of adapted_blocks
        if seen[tower] < depth[tower]:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or block.attn.in_proj_weight is None:
                raise ValueError(f"{name}: DIKI needs open_clip's ResidualAttentionBlock (a packed nn.MultiheadAttention)")
            chosen.append((tower, name, block))
            seen[tower] += 1
    missing = [t for t in TOWERS if depth[t] > 0 and seen[t] == 0]
    if missing:
        raise ValueError(f"{type(clip).__name__} has no transformer blocks in its {' and '.join(missing)} tower(s): "
                         "DIKI needs an open_clip ViT CLIP")
    return chosen


class DIKIPrefixes(nn.Module):
    """All prefixes of one CLIP (one :class:`BlockPrefixes` per prefixed block), hooked into its attentions."""

    def __init__(self, clip: nn.Module, cfg: PrefixConfig, num_tasks: int) -> None:
        super().__init__()
        self.cfg, self.num_tasks = cfg, num_tasks
        found = prefixed_blocks(clip, cfg)
        self.names = [name for _, name, _ in found]
        self.towers = [tower for tower, _, _ in found]
        self.blocks = nn.ModuleList(
            BlockPrefixes(block.attn.embed_dim, cfg.length, num_tasks, cfg.key_init, block.attn.in_proj_weight.device)
            for _, _, block in found)
        self.routes: dict[str, Optional[Route]] = {t: None for t in TOWERS}
        self._handles = [block.attn.register_forward_hook(self._hook(tower, prefixes), with_kwargs=True)
                         for (tower, _, block), prefixes in zip(found, self.blocks)]

    def _hook(self, tower: str, prefixes: BlockPrefixes) -> Callable:
        def add_prefix_branch(attn: nn.MultiheadAttention, args, kwargs, output):
            route = self.routes[tower]
            if route is None:
                return output
            query = args[0] if args else kwargs["query"]
            return (output[0] + self.residual(attn, prefixes, query, route), *output[1:])

        return add_prefix_branch

    def residual(self, attn: nn.MultiheadAttention, prefixes: BlockPrefixes, query: torch.Tensor,
                 route: Route) -> torch.Tensor:
        """``w * concat_h(R_h) @ W_o^T`` in ``query``'s layout (the out-projection's bias belongs to the frozen branch)."""
        x = query if attn.batch_first else query.transpose(0, 1)
        d = attn.embed_dim
        q = F.linear(x, attn.in_proj_weight[:d], None if attn.in_proj_bias is None else attn.in_proj_bias[:d])
        task = route.task
        if isinstance(task, torch.Tensor) and task.shape != (x.shape[0],):
            raise ValueError(f"per-sample tasks of shape {tuple(task.shape)}, but the batch has {x.shape[0]} samples")
        keys, values = prefixes.gather(task)
        r = prefix_attention(q, keys, values, attn.num_heads) * _per_sample(route.weight, x.shape[0], q)
        y = F.linear(r, attn.out_proj.weight)
        return y if attn.batch_first else y.transpose(0, 1)

    @contextmanager
    def routing(self, image: Optional[Route] = None, text: Optional[Route] = None) -> Iterator[None]:
        """Route each tower as given (``None``: prefixes off) inside the block, then restore the previous routes."""
        previous, self.routes = self.routes, {"image": image, "text": text}
        try:
            yield
        finally:
            self.routes = previous

    def task_parameters(self, task: int) -> list[tuple[str, nn.Parameter]]:
        """Task ``task``'s prefix keys and values (``requires_grad`` on), every other prefix frozen."""
        self.requires_grad_(False)
        chosen = []
        for i, block in enumerate(self.blocks):
            for kind in ("keys", "values"):
                param = getattr(block, kind)[task].requires_grad_(True)
                chosen.append((f"blocks.{i}.{kind}.{task}", param))
        return chosen

    def parameters_per_task(self) -> int:
        """Prefix parameters of one task: ``2 L (sum of the prefixed blocks' widths)``."""
        return sum(b.keys[0].numel() + b.values[0].numel() for b in self.blocks)

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
