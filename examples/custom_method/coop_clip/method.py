"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022) as a continual method.

The CLIP stays frozen. Each task learns its own ``n_ctx`` context vectors ``v_1..v_M`` that replace
the words of a prompt: class ``c`` is encoded from the token embeddings ``[SOS] v_1 .. v_M c . [EOS]``
by the frozen text tower, and

``L = CE(s f(x) g_t(c)^T, y)``,  ``g_t(c) = normalise(text_tower([SOS] v^t_1 .. v^t_M  emb(c) . [EOS]))``

trains only ``v^t``. Evaluation uses the learned context of the evaluated dataset when that dataset
was a trained task (MTIL gives the dataset), and CLIP's hand-written templates otherwise, so the
accuracy on not-yet-trained datasets is exactly zero-shot CLIP's.

Written only against :class:`zscl.methods.base.CLIPMethod`: ``__init__`` sets ``self.trainable``;
:meth:`class_features` replaces the class prompts' encoding used by the base ``training_step``;
:meth:`prepare_evaluation` builds the heads; :meth:`export_sidecars` / :meth:`load_export` carry the
contexts beside the (unchanged) CLIP weights, which is also how the next task finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from zscl.evaluation.zeroshot import spec_classifier
from zscl.methods.base import CLIPMethod

SUFFIX = ".coop.safetensors"


def sidecar(path: str) -> Path:
    """``X.safetensors`` -> ``X.coop.safetensors`` (the contexts of the tasks trained up to this export)."""
    p = Path(path)
    return p.with_name(p.name[: -len(".safetensors")] + SUFFIX)


class CoOpCLIP(CLIPMethod):
    """CoOp prompt learning, one context per task, on a frozen CLIP (module docstring).

    Args:
        n_ctx: context vectors per prompt (CoOp: 16; 4 is CoOp's "a photo of a" length).
        ctx_init_std: the contexts start as N(0, std^2), CoOp's random initialisation.
        ctx_lr: the contexts' learning rate (None: the task's ``lr``); prompts need a far larger rate
            than full fine-tuning.
        **kwargs: :class:`~zscl.methods.base.CLIPMethod`'s arguments.
    """

    sidecar_suffixes = (SUFFIX,)
    plain_clip_evaluation = False

    def __init__(self, n_ctx: int = 4, ctx_init_std: float = 0.02, ctx_lr: Optional[float] = 2e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip.requires_grad_(False)
        width = self.clip.token_embedding.weight.shape[1]
        prior = _prior_export(self.hparams.init_from, self.hparams.pretrained)
        contexts, names = _read_contexts(prior) if prior else ([], [])
        self.contexts = torch.nn.ParameterList([torch.nn.Parameter(c, requires_grad=False) for c in contexts])
        new = torch.nn.Parameter(torch.randn(n_ctx, width) * ctx_init_std)  # this task's context
        self.contexts.append(new)
        self.task_names: list[str] = list(names)
        self.trainable = [(f"contexts.{len(self.contexts) - 1}", new)]

    # ----------------------------------------------------------------- prompts
    def _prompt_tokens(self, classnames: list[str]) -> torch.Tensor:
        """``X X .. X <class>.`` tokenised: the X positions (1..n_ctx) are replaced by the context."""
        marks = " ".join(["X"] * self.hparams.n_ctx)
        return self.bundle.tokenizer([f"{marks} {c}." for c in classnames]).to(self.device)

    def encode_prompts(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """open_clip's text tower from token embeddings whose positions 1..n_ctx are ``context``."""
        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast)
        n = context.shape[0]
        x = torch.cat([x[:, :1], context.to(cast).expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
        x = clip.transformer(x + clip.positional_embedding.to(cast), attn_mask=clip.attn_mask)
        x = text_global_pool(clip.ln_final(x), tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        x = clip.text_projection(x) if isinstance(clip.text_projection, torch.nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1)

    # ----------------------------------------------------------------- training
    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.hparams.ctx_lr if self.hparams.ctx_lr is not None else self.hparams.lr
        return [{"params": [p for _, p in self.trainable], "lr": lr, "weight_decay": self.hparams.weight_decay}]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        spec = self.trainer.datamodule.spec
        self._train_tokens = self._prompt_tokens(list(spec.classnames))
        self._train_name = spec.name

    def class_features(self) -> torch.Tensor:
        return self.encode_prompts(self._train_tokens, self.contexts[-1])

    def on_train_end(self) -> None:
        if getattr(self, "_train_name", None) and len(self.task_names) < len(self.contexts):
            self.task_names.append(self._train_name)
        super().on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["coop_task_names"] = list(self.task_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.task_names = list(checkpoint.get("coop_task_names", self.task_names))

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def prepare_evaluation(self) -> None:
        heads = []
        for spec in self._specs:
            if spec.name in self.task_names:  # a trained task: its own learned context
                context = self.contexts[self.task_names.index(spec.name)]
                heads.append(self.encode_prompts(self._prompt_tokens(list(spec.classnames)), context).float().t())
            else:  # never trained: zero-shot CLIP with the dataset's templates
                heads.append(spec_classifier(self.clip, self.bundle.tokenizer, spec, device=self.device))
        self._classifiers = heads

    def describe(self) -> str:
        return f"CoOp contexts of {len(self.task_names)} task(s): {', '.join(self.task_names)}"

    # ----------------------------------------------------------------- export
    def export_sidecars(self, path: str) -> None:
        from safetensors.torch import save_file

        done = len(self.task_names)
        tensors = {f"context.{i}": self.contexts[i].detach().cpu().contiguous() for i in range(done)}
        save_file(tensors, str(sidecar(path)), metadata={"task_names": "\n".join(self.task_names)})


def _prior_export(init_from: Optional[str], pretrained: Optional[str]) -> Optional[str]:
    """The export whose contexts this module continues: ``init_from``, else an export given as ``pretrained``."""
    for path in (init_from, pretrained if not init_from else None):
        if path and str(path).endswith(".safetensors") and sidecar(path).exists():
            return str(path)
    return None


def _read_contexts(path: str) -> tuple[list[torch.Tensor], list[str]]:
    from safetensors import safe_open

    with safe_open(str(sidecar(path)), framework="pt") as f:
        names = [n for n in (f.metadata() or {}).get("task_names", "").split("\n") if n]
        return [f.get_tensor(f"context.{i}") for i in range(len(names))], names
