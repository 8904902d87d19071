"""Routing: which rule (model + destinations) a completed series goes to, and why.

Decisions recorded here (the configuration side is in :mod:`dicom_node.settings`):

- Rules are evaluated in configuration order and the FIRST rule whose patterns
  all match wins; every rule is still evaluated so a dry run (``dicom-node
  route``) and a rejection can explain each one.
- A pattern matches the whole value (``re.fullmatch``) unless written with a
  leading ``~``, which searches (``re.search``). So ``MR`` never matches ``MRX``
  or ``RTSTRUCT``.
- Multi-valued attributes (ImageType) are matched as their backslash-joined text,
  the way they are written in DICOM. A missing or empty attribute never matches.
- Reasons are plain sentences stored with the job, e.g.
  ``no rule matched: rule brain-mr: Modality 'CT' does not match ^(?:MR)$``.
  Values of attributes that identify the patient are masked in them, because
  reasons are logged and shown in job listings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.multival import MultiValue

from dicom_node.logging_setup import MASK, is_phi_key
from dicom_node.settings import SEARCH_PREFIX, RoutingRule

_MAX_SHOWN_VALUE = 64


@dataclass(frozen=True)
class Pattern:
    """One ``keyword = "regex"`` condition of a rule."""

    keyword: str
    regex: re.Pattern[str]
    search: bool

    @classmethod
    def parse(cls, keyword: str, text: str) -> Pattern:
        search = text.startswith(SEARCH_PREFIX)
        return cls(keyword, re.compile(text.removeprefix(SEARCH_PREFIX)), search)

    def describe(self) -> str:
        """The pattern as it is applied: anchored, or searched."""
        return f"~{self.regex.pattern}" if self.search else f"^(?:{self.regex.pattern})$"

    def check(self, header: Dataset) -> tuple[bool, str]:
        """Whether ``header`` satisfies this condition, and a sentence saying why."""
        value = _text_value(header, self.keyword)
        if value is None:
            return False, f"{self.keyword} is missing"
        shown = MASK if is_phi_key(self.keyword) else f"'{_shorten(value)}'"
        found = self.regex.search(value) if self.search else self.regex.fullmatch(value)
        if found:
            return True, f"{self.keyword} {shown} matches {self.describe()}"
        return False, f"{self.keyword} {shown} does not match {self.describe()}"


@dataclass(frozen=True)
class CompiledRule:
    """A validated :class:`RoutingRule` with its patterns compiled once."""

    rule: RoutingRule
    patterns: tuple[Pattern, ...]

    @property
    def name(self) -> str:
        return self.rule.name

    def evaluate(self, header: Dataset) -> RuleOutcome:
        """Check every pattern; a rule without patterns matches every series."""
        results = [pattern.check(header) for pattern in self.patterns]
        matched = all(ok for ok, _ in results)
        if not results:
            detail = "matches every series (no patterns)"
        elif matched:
            detail = ", ".join(why for _, why in results)
        else:
            detail = ", ".join(why for ok, why in results if not ok)
        return RuleOutcome(self.rule, matched, detail)


@dataclass(frozen=True)
class RuleOutcome:
    """How one rule judged one series."""

    rule: RoutingRule
    matched: bool
    detail: str

    def __str__(self) -> str:
        return f"rule {self.rule.name}: {self.detail}"


@dataclass(frozen=True)
class RouteDecision:
    """The winning rule (None: rejected), the reason to record, and each rule's
    own outcome in configuration order."""

    rule: RoutingRule | None
    reason: str
    outcomes: tuple[RuleOutcome, ...] = ()

    @property
    def matched(self) -> bool:
        return self.rule is not None


def compile_rules(rules: Sequence[RoutingRule]) -> list[CompiledRule]:
    """Compile rules once (they were validated when the settings were loaded)."""
    return [CompiledRule(rule, tuple(Pattern.parse(k, v) for k, v in rule.match.items())) for rule in rules]


def route_series(rules: Sequence[CompiledRule | RoutingRule], header: Dataset) -> RouteDecision:
    """Route a completed series by one of its headers (first matching rule wins)."""
    compiled = [r if isinstance(r, CompiledRule) else compile_rules([r])[0] for r in rules]
    outcomes = tuple(rule.evaluate(header) for rule in compiled)
    winner = next((o for o in outcomes if o.matched), None)
    if winner is not None:
        return RouteDecision(winner.rule, f"rule {winner.rule.name} matched: {winner.detail}", outcomes)
    if not outcomes:
        return RouteDecision(None, "no rule matched: no routing rules are configured", outcomes)
    return RouteDecision(None, "no rule matched: " + "; ".join(map(str, outcomes)), outcomes)


def _text_value(header: Dataset, keyword: str) -> str | None:
    """The attribute as text (multi-values backslash-joined); None if absent or empty."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text or None


def _shorten(value: str) -> str:
    return value if len(value) <= _MAX_SHOWN_VALUE else value[: _MAX_SHOWN_VALUE - 3] + "..."
