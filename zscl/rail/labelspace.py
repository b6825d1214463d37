"""The union label space of X-TAIL (Xu et al., NeurIPS 2024): every domain of the sequence at once.

In X-TAIL no domain id is given at test time: after every task each domain's test images are
classified among the class names of *all* domains of the sequence, seen and unseen. Classes are
concatenated in domain order, so domain ``k`` owns the union indices
``offsets[k] .. offsets[k] + sizes[k]``, and a domain's local label ``y`` is union label
``offsets[k] + y``. A class name that occurs in two domains (``lotus`` in Flowers and SUN397) keeps
two indices, one per domain, each prompted with its own domain's templates, as the reference does.
The zero-shot classifier is :func:`zscl.evaluation.zeroshot.build_classifier` per domain, concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import torch

__all__ = ["DomainLike", "UnionLabelSpace", "build_union_classifier", "union_label_space"]


class DomainLike(Protocol):
    """What a domain needs here: a :class:`zscl.datasets.DatasetSpec` has these fields."""

    name: str
    classnames: Sequence[str]
    templates: Sequence[str]


@dataclass(frozen=True)
class UnionLabelSpace:
    """Ordered domains, the union class list, each class's templates, and each domain's offset."""

    domains: tuple[str, ...]
    classnames: tuple[str, ...]
    class_templates: tuple[tuple[str, ...], ...]  # per union class: its own domain's templates
    class_domain: tuple[int, ...]  # per union class: the index of the domain that owns it
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def index(self, domain: str) -> int:
        """The position of ``domain`` in the sequence (case-insensitive)."""
        lowered = [d.lower() for d in self.domains]
        if domain.lower() not in lowered:
            raise KeyError(f"domain {domain!r} is not in the label space {list(self.domains)}")
        return lowered.index(domain.lower())

    def domain_slice(self, domain: Union[str, int]) -> slice:
        """The union columns owned by ``domain`` (a name or a position)."""
        k = domain if isinstance(domain, int) else self.index(domain)
        return slice(self.offsets[k], self.offsets[k] + self.sizes[k])

    def to_union(self, domain: Union[str, int], labels: torch.Tensor) -> torch.Tensor:
        """A domain's local labels as union labels (add the domain's offset)."""
        return labels + self.domain_slice(domain).start

    def learned_classes(self, num_domains: int) -> int:
        """Classes owned by the first ``num_domains`` domains: a prefix of the union, since domains
        arrive in union order. This is the ridge head's width after that many tasks."""
        return sum(self.sizes[:num_domains])


def _as_domain(domain: Union[str, DomainLike]) -> DomainLike:
    if isinstance(domain, str):
        from zscl.datasets import get_dataset

        return get_dataset(domain)
    return domain


def union_label_space(domains: Sequence[Union[str, DomainLike]]) -> UnionLabelSpace:
    """The union over ``domains`` in order (names are looked up with :func:`zscl.datasets.get_dataset`).

    Repeated class names are kept as separate indices: merging them would tie two domains'
    labels together and change what an error means in each domain.
    """
    specs = [_as_domain(d) for d in domains]
    names = [s.name for s in specs]
    if len({n.lower() for n in names}) != len(names):
        raise ValueError(f"a domain occurs twice in {names}; each domain contributes its classes once")
    classnames: list[str] = []
    templates: list[tuple[str, ...]] = []
    owner: list[int] = []
    offsets: list[int] = []
    for k, spec in enumerate(specs):
        offsets.append(len(classnames))
        classnames += list(spec.classnames)
        templates += [tuple(spec.templates)] * len(spec.classnames)
        owner += [k] * len(spec.classnames)
    sizes = tuple(len(s.classnames) for s in specs)
    return UnionLabelSpace(tuple(names), tuple(classnames), tuple(templates), tuple(owner), tuple(offsets), sizes)


def build_union_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    domains: Sequence[Union[str, DomainLike]],
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Zero-shot head ``W`` [D, C_union]: each domain's own classifier (its classes, its templates,
    :func:`zscl.evaluation.zeroshot.build_classifier`) side by side, in union order."""
    from zscl.evaluation.zeroshot import build_classifier

    specs = [_as_domain(d) for d in domains]
    heads = [build_classifier(model, tokenizer, s.classnames, s.templates, device=device, amp_dtype=amp_dtype)
             for s in specs]
    return torch.cat(heads, dim=1)
