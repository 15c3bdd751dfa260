"""The Prometheus texts of several replicas as one exposition: each metric family once, every
sample labelled with its `replica`.

Each replica's text is parsed with prometheus_client's own parser and the families are written
again with its own exposition code, so HELP/TYPE appear once per family and a histogram's
_bucket/_count/_sum samples stay together under it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_families(texts: dict[str, str]) -> list[Metric]:
    """Every replica's families merged by name, samples labelled `replica` (replicas in name
    order). A replica whose text does not parse is left out; a family that a replica types
    differently from the first replica that has it keeps the first type and drops that
    replica's samples (a mixed-version fleet, mid-upgrade)."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif into.type != family.type:
                continue
            into.samples += [s._replace(labels={"replica": replica, **s.labels}) for s in family.samples]
    return list(merged.values())


def render(families: Iterable[Metric]) -> bytes:
    """Families in the Prometheus text format (0.0.4), as prometheus_client writes them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    return generate_latest(registry)


def merge_metrics(texts: dict[str, str], own: Iterable[Metric] = ()) -> bytes:
    """The replicas' texts merged (see `merge_families`), followed by the caller's own families."""
    return render([*merge_families(texts), *own])
