"""Deriving and checking the stage graph from ``requires``/``provides`` declarations."""
from __future__ import annotations

from typing import Iterable, Sequence

from .errors import DagError
from .stage import Stage


class Dag:
    """Stages in a valid execution order, with producers of every product.

    Checked on construction, before any work starts: a product required but made by no stage
    (and not a source), a product made by two stages, or a cycle each raise :class:`DagError`.
    """

    def __init__(self, stages: Sequence[Stage], sources: Iterable[str] = ("exposure",)) -> None:
        self.sources = frozenset(sources)
        self.stages = {s.name: s for s in stages}
        if len(self.stages) != len(stages):
            names = [s.name for s in stages]
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DagError(f"stage names must be unique; repeated: {dup}")
        self.producer: dict[str, Stage] = {}
        for s in stages:
            for p in s.provides:
                if p in self.sources:
                    raise DagError(f"stage {s.name!r} provides {p!r}, which the engine supplies itself")
                if p in self.producer:
                    raise DagError(f"product {p!r} is provided by two stages: {self.producer[p].name!r} and {s.name!r}")
                self.producer[p] = s
            for t in s.transient:
                if t not in s.provides:
                    raise DagError(f"stage {s.name!r} marks {t!r} transient but does not provide it")
        for s in stages:
            for r in s.requires:
                if r not in self.producer and r not in self.sources:
                    raise DagError(f"stage {s.name!r} requires {r!r}, which no stage provides")
        self.order = self._toposort(list(stages))

    def inputs(self, stage: Stage) -> list[str]:
        """Products the stage gets: its requirements plus optional ones that some stage makes."""
        return list(stage.requires) + [o for o in stage.optional if o in self.producer]

    def deps(self, stage: Stage) -> list[Stage]:
        return [self.producer[r] for r in self.inputs(stage) if r in self.producer]

    def _toposort(self, stages: list[Stage]) -> list[Stage]:
        order: list[Stage] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(s: Stage, path: list[str]) -> None:
            if state.get(s.name) == 2:
                return
            if state.get(s.name) == 1:
                cycle = path[path.index(s.name):] + [s.name]
                raise DagError(f"stage graph has a cycle: {' -> '.join(cycle)}")
            state[s.name] = 1
            for d in self.deps(s):
                visit(d, path + [s.name])
            state[s.name] = 2
            order.append(s)

        for s in stages:  # declaration order breaks ties, so the order is deterministic
            visit(s, [])
        return order

    def needed_for(self, targets: Iterable[str] | None) -> list[Stage]:
        """The stages (in order) that must run to make ``targets`` (products or stage names)."""
        if targets is None:
            return list(self.order)
        need: set[str] = set()
        todo: list[Stage] = []
        for t in targets:
            if t in self.stages:
                todo.append(self.stages[t])
            elif t in self.producer:
                todo.append(self.producer[t])
            elif t in self.sources:
                continue
            else:
                raise DagError(f"unknown target {t!r}: not a product or stage name ({sorted(self.producer)})")
        while todo:
            s = todo.pop()
            if s.name in need:
                continue
            need.add(s.name)
            todo.extend(self.deps(s))
        return [s for s in self.order if s.name in need]

    def downstream_of(self, stage_name: str) -> set[str]:
        """Names of the stage and of every stage that depends on it, directly or not."""
        if stage_name not in self.stages:
            raise DagError(f"unknown stage {stage_name!r}; stages: {list(self.stages)}")
        out = {stage_name}
        changed = True
        while changed:
            changed = False
            for s in self.order:
                if s.name not in out and any(d.name in out for d in self.deps(s)):
                    out.add(s.name)
                    changed = True
        return out
