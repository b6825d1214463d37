"""Mixture-of-experts adapters in the residual blocks of an open_clip CLIP (Yu et al., CVPR 2024).

Every residual block of both towers gets ``E`` experts and one router per task. The adapters
run parallel to the MLP on the post-attention residual stream ``x``:

``x <- x + MLP(LN_2(x)) + sum_k g_k(x_0) * A_k(x)``,  ``A(x) = 0.1 * Up(Dropout(ReLU(Down(x))))``

* ``Down``: Linear(d, 64), kaiming-uniform(a=sqrt(5)) weight, zero bias; ``Up``: Linear(64, d),
  all zero, so an untrained adapter adds exactly 0 (the model *is* the pretrained CLIP).
* Gates (noisy top-k, Shazeer et al. 2017): ``h = x_0 W_t`` (+ ``N(0,1) * (softplus(x_0 W^noise_t) + 0.01)``
  in training), ``g = softmax`` over the top-k entries of ``h``, 0 elsewhere; ``x_0`` is token 0
  (CLS / SOT) of each sample, so one gate vector per sample applies to all its tokens.
  ``W_t`` and ``W^noise_t`` are zero-initialised d x E matrices, one pair per task and block.
* Activate-freeze: after each task the ``freeze_top`` most-selected experts of each block are
  frozen (no gradient in later tasks).

No fork of open_clip: a forward pre-hook on ``ln_2`` keeps the block's residual stream and a
forward hook on ``mlp`` adds the adapter output to the MLP output. State-dict keys of the CLIP
are unchanged; the adapters live in :class:`MoEAdapters`, a separate module. If a block has a
LayerScale ``ls_2`` (CLIP ViTs do not), it scales the adapter output too.

Routing (:attr:`MoEAdapters.routes`): ``None`` = adapters off (the plain CLIP); an ``int`` = that
task's router for every sample; a LongTensor [B] = per-sample task, ``-1`` = adapters off.

Deviations from the reference (same maths): the experts of a block run as two batched matmuls
over the gathered top-k expert weights instead of a dispatcher; the gate scales the hidden
activation before the up-projection; the experts of a block are stacked tensors (row e = expert e)
and activate-freeze detaches the frozen rows instead of setting ``requires_grad=False``; the training noise and dropout draw from a generator seeded
per step (:meth:`MoEAdapters.seed_step`), so a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Routes = Union[None, int, torch.Tensor]


@dataclass
class MoEConfig:
    """Hyperparameters of the adapters (defaults: the reference's MTIL scripts)."""

    num_experts: int = 22
    top_k: int = 2
    bottleneck: int = 64
    dropout: float = 0.1
    scale: float = 0.1
    noise_epsilon: float = 0.01
    freeze_top: int = 2  # experts frozen per block after each task (activate-freeze); 0 = off
    towers: tuple[str, ...] = ("image", "text")


class BlockExperts(nn.Module):
    """The experts, routers and bookkeeping of one residual block."""

    def __init__(self, width: int, cfg: MoEConfig, num_tasks: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.cfg = cfg
        e, r = cfg.num_experts, cfg.bottleneck
        # Expert e's Linear(d, r) and Linear(r, d) are row e of these stacked tensors (nn.Linear layout).
        self.down_weight = nn.Parameter(torch.empty(e, r, width, device=device))
        self.down_bias = nn.Parameter(torch.zeros(e, r, device=device))
        self.up_weight = nn.Parameter(torch.zeros(e, width, r, device=device))
        self.up_bias = nn.Parameter(torch.zeros(e, width, device=device))
        for i in range(e):
            nn.init.kaiming_uniform_(self.down_weight.data[i], a=math.sqrt(5))
        self.routers = nn.ParameterList(torch.zeros(width, cfg.num_experts, device=device) for _ in range(num_tasks))
        self.noise = nn.ParameterList(torch.zeros(width, cfg.num_experts, device=device) for _ in range(num_tasks))
        self.register_buffer("frozen", torch.zeros(cfg.num_experts, dtype=torch.bool, device=device))
        self.register_buffer("usage", torch.zeros(cfg.num_experts, dtype=torch.long, device=device))

    def expert_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def _unfrozen(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` with the frozen experts' rows detached: they get exactly zero gradient (activate-freeze)."""
        if not p.requires_grad:  # no host sync on frozen.any(): the where is cheap
            return p
        return torch.where(self.frozen.view(-1, *[1] * (p.dim() - 1)), p.detach(), p)

    def gates(self, x0: torch.Tensor, routes: Union[int, torch.Tensor], noisy: bool,
              generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert indices [B, k], their gates [B, k] summing to 1)."""
        x0 = x0.float()
        if isinstance(routes, int):
            w, wn = self.routers[routes], self.noise[routes]
            logits = x0 @ w
            std = F.softplus(x0 @ wn) + self.cfg.noise_epsilon if noisy else None
        else:
            pick = routes.clamp(min=0)
            logits = torch.einsum("bd,bde->be", x0, _select(torch.stack(list(self.routers)), pick))
            std = (F.softplus(torch.einsum("bd,bde->be", x0, _select(torch.stack(list(self.noise)), pick)))
                   + self.cfg.noise_epsilon) if noisy else None
        if std is not None:
            eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + eps * std
        top, idx = logits.topk(self.cfg.top_k, dim=1)
        return idx, torch.softmax(top, dim=1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """``sum_k g_k A_{idx_k}(x)`` for batch-first ``x`` [B, L, d]."""
        b, k, r = idx.shape[0], idx.shape[1], self.cfg.bottleneck
        dtype = x.dtype
        w_down, b_down, w_up, b_up = (_select(self._unfrozen(p).to(dtype), idx) for p in self.expert_parameters())
        # w_down [B, k, r, d], b_down [B, k, r], w_up [B, k, d, r], b_up [B, k, d]
        h = torch.bmm(x, w_down.flatten(1, 2).transpose(1, 2)) + b_down.flatten(1, 2)[:, None]  # [B, L, k r]
        h = F.relu(h)
        p = self.cfg.dropout
        if self.training and p > 0:
            keep = torch.rand(h.shape, generator=generator, device=h.device) >= p
            h = h * keep.to(dtype) / (1 - p)
        g = gates.to(dtype)
        h = h * g.repeat_interleave(r, dim=1)[:, None]
        y = torch.bmm(h, w_up.permute(0, 1, 3, 2).reshape(b, k * r, -1))
        y = y + torch.einsum("bk,bkd->bd", g, b_up)[:, None]
        return self.cfg.scale * y


def _select(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``p[idx]`` as a one-hot matmul. Indexing's backward is a scatter-add, which sums in a
    thread-dependent order on multi-core CPUs (runs, and a run and its resumption, then differ in
    the last bits); a matmul's backward is deterministic. E is small (22), so this costs little."""
    onehot = F.one_hot(idx, p.shape[0]).to(p.dtype)  # [..., E]
    return (onehot @ p.flatten(1)).unflatten(-1, p.shape[1:])


def adapted_blocks(clip: nn.Module, towers: tuple[str, ...] = ("image", "text")) -> list[tuple[str, nn.Module, bool]]:
    """``(name, block, batch_first)`` of every residual block (``ln_2`` + ``mlp``) in the chosen towers."""
    found = []
    for name, module in clip.named_modules():
        resblocks = getattr(module, "resblocks", None)
        if not isinstance(resblocks, nn.ModuleList):
            continue
        tower = "image" if name.startswith("visual") else "text"
        if tower not in towers:
            continue
        batch_first = bool(getattr(module, "batch_first", True))
        for i, block in enumerate(resblocks):
            if hasattr(block, "ln_2") and hasattr(block, "mlp"):
                found.append((f"{name}.resblocks.{i}", block, batch_first))
    if not found:
        raise ValueError(f"{type(clip).__name__} has no transformer residual blocks (ln_2 + mlp) to adapt: "
                         "MoE-Adapters need a ViT image tower and/or a transformer text tower")
    return found


class MoEAdapters(nn.Module):
    """All blocks' experts and routers for one CLIP, hooked into its blocks (see the module docstring)."""

    def __init__(self, clip: nn.Module, cfg: MoEConfig, num_tasks: int) -> None:
        super().__init__()
        if cfg.top_k > cfg.num_experts or cfg.top_k < 1:
            raise ValueError(f"top_k must be in 1..num_experts={cfg.num_experts}, got {cfg.top_k}")
        self.cfg, self.num_tasks = cfg, num_tasks
        found = adapted_blocks(clip, tuple(cfg.towers))
        self.names = [name for name, _, _ in found]
        # on the CLIP's device (a meta-device CLIP gets meta adapters: shapes without memory)
        self.blocks = nn.ModuleList(BlockExperts(_width(block), cfg, num_tasks, block.ln_2.weight.device)
                                    for _, block, _ in found)
        self.routes: Routes = None
        self.recording = False  # count expert selections (for activate-freeze)
        self.generator: Optional[torch.Generator] = None
        self._handles = []
        for (_, block, batch_first), experts in zip(found, self.blocks):
            self._hook(block, experts, batch_first)

    def _hook(self, block: nn.Module, experts: BlockExperts, batch_first: bool) -> None:
        stash: dict[str, torch.Tensor] = {}

        def keep_stream(_module, args):
            stash["x"] = args[0]

        def add_adapters(_module, _args, output):
            x = stash.pop("x", None)
            y = self._adapt(experts, x, batch_first) if x is not None else None
            return output if y is None else output + y

        self._handles.append(block.ln_2.register_forward_pre_hook(keep_stream))
        self._handles.append(block.mlp.register_forward_hook(add_adapters))

    def _adapt(self, experts: BlockExperts, x: torch.Tensor, batch_first: bool) -> Optional[torch.Tensor]:
        routes = self.routes
        if routes is None:
            return None
        xb = x if batch_first else x.transpose(0, 1)
        mask = None
        if isinstance(routes, torch.Tensor):
            if routes.shape[0] != xb.shape[0]:
                raise ValueError(f"per-sample routes for {routes.shape[0]} samples, but the batch has {xb.shape[0]}")
            mask = routes >= 0
            if not bool(mask.any()):
                return None
        idx, gates = experts.gates(xb[:, 0], routes, self.training, self.generator)
        if self.recording:
            experts.usage += torch.bincount(idx.flatten(), minlength=self.cfg.num_experts)
        y = experts(xb, idx, gates, self.generator)
        if mask is not None:
            y = y * mask.to(y.dtype)[:, None, None]
        return y if batch_first else y.transpose(0, 1)

    @contextmanager
    def routing(self, routes: Routes):
        """Use ``routes`` inside the block (see the module docstring), then restore the previous ones."""
        previous, self.routes = self.routes, routes
        try:
            yield
        finally:
            self.routes = previous

    def seed_step(self, seed: int, device: torch.device) -> None:
        """Draw this step's gate noise and dropout from a generator seeded by ``seed``."""
        self.generator = torch.Generator(device=device).manual_seed(seed)

    # ------------------------------------------------------------------ task bookkeeping
    def set_trainable(self, task: int) -> list[tuple[str, nn.Parameter]]:
        """``requires_grad`` on task ``task``'s router and noise and on the experts; the rest frozen.

        Frozen experts are rows of the expert tensors: they are detached in the forward, so their
        gradient is exactly zero and (with weight decay 0 and fresh Adam moments) they never move.
        """
        self.requires_grad_(False)
        chosen = []
        for i, block in enumerate(self.blocks):
            block.routers[task].requires_grad_(True)
            block.noise[task].requires_grad_(True)
            chosen += [(f"blocks.{i}.routers.{task}", block.routers[task]), (f"blocks.{i}.noise.{task}", block.noise[task])]
            for pname in ("down_weight", "down_bias", "up_weight", "up_bias"):
                param = getattr(block, pname).requires_grad_(True)  # frozen rows are detached in forward
                chosen.append((f"blocks.{i}.{pname}", param))
        return chosen

    def freeze_most_used(self) -> None:
        """Activate-freeze: add each block's ``freeze_top`` most-selected experts of this task to its frozen set."""
        k = self.cfg.freeze_top
        for block in self.blocks:
            if k > 0 and int(block.usage.sum()) > 0:
                # stable sort: ties go to the lower index, as topk does on equal counts
                order = torch.sort(block.usage, descending=True, stable=True).indices[:k]
                block.frozen[order] = True
            block.usage.zero_()


def _width(block: nn.Module) -> int:
    return int(block.ln_2.weight.shape[0])
