"""Network settings as checked data: a profile's ``network:`` block (YAML or ``--conf <model>_set``) becomes
a dataclass, and a key the dataclass does not have is an error naming it and the accepted ones (a typo such
as ``widht`` would otherwise build the default network without a word)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


def refuse_unknown(keys: Iterable[str], accepted: Iterable[str], where: str) -> None:
    """ValueError naming the keys not in ``accepted`` and the accepted ones (the one wording of this refusal,
    also used by the typed train settings, lib/trainers/settings.py)."""
    accepted = list(accepted)
    unknown = sorted(set(keys) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {accepted}")


def typed(cls: type[T], d: Mapping[str, Any] | None, where: str, ignore: Iterable[str] = ()) -> T:
    """``cls(**d)`` for a dataclass ``cls``, refusing unknown keys (``ignore``: keys another component reads)."""
    d = dict(d or {})
    for k in ignore:
        d.pop(k, None)
    refuse_unknown(d, [f.name for f in dataclasses.fields(cls)], where)
    return cls(**d)
