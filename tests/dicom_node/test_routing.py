"""Routing rules: anchored patterns, search patterns, multi-values, missing
attributes, first match wins, and reasons a physicist can read."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from dicom_node.routing import compile_rules, route_series
from dicom_node.settings import RoutingRule


def header(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def rule(name: str, **match: str) -> RoutingRule:
    return RoutingRule(name=name, match=match)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case "mr" on purpose
@pytest.mark.parametrize("modality", ["MRX", "XMR", "RTSTRUCT", "MR\\CT", "mr"])
def test_patterns_are_anchored(modality: str) -> None:
    decision = route_series(compile_rules([rule("brain-mr", Modality="MR")]), header(Modality=modality))
    assert not decision.matched
    assert decision.reason == f"no rule matched: rule brain-mr: Modality '{modality}' does not match ^(?:MR)$"


def test_exact_value_matches() -> None:
    decision = route_series(compile_rules([rule("brain-mr", Modality="MR")]), header(Modality="MR"))
    assert decision.matched and decision.rule is not None and decision.rule.name == "brain-mr"
    assert decision.reason == "rule brain-mr matched: Modality 'MR' matches ^(?:MR)$"


def test_series_description_regex_and_search_prefix() -> None:
    rules = compile_rules(
        [rule("t1ce", SeriesDescription="(?i)(ax )?t1.*(\\+c|gad)"), rule("any-t1", SeriesDescription="~T1")]
    )
    assert route_series(rules, header(SeriesDescription="AX T1 MPRAGE +C")).rule.name == "t1ce"
    assert route_series(rules, header(SeriesDescription="t1_gad")).rule.name == "t1ce"
    assert route_series(rules, header(SeriesDescription="sag T1 pre")).rule.name == "any-t1"
    rejected = route_series(rules, header(SeriesDescription="T2 FLAIR"))
    assert not rejected.matched
    assert "rule any-t1: SeriesDescription 'T2 FLAIR' does not match ~T1" in rejected.reason


def test_multi_valued_attribute_is_backslash_joined() -> None:
    rules = compile_rules([rule("original", ImageType="ORIGINAL\\\\PRIMARY\\\\.*")])
    assert route_series(rules, header(ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])).matched
    assert not route_series(rules, header(ImageType=["DERIVED", "SECONDARY"])).matched


def test_missing_or_empty_attribute_never_matches() -> None:
    rules = compile_rules([rule("anything", SeriesDescription=".*")])
    for ds in (header(Modality="MR"), header(SeriesDescription="")):
        decision = route_series(rules, ds)
        assert not decision.matched
        assert decision.reason == "no rule matched: rule anything: SeriesDescription is missing"


def test_all_patterns_must_match_and_failures_are_listed() -> None:
    rules = compile_rules([rule("brain-mr", Modality="MR", SeriesDescription="~T1", BodyPartExamined="BRAIN|HEAD")])
    decision = route_series(rules, header(Modality="MR", SeriesDescription="T2", BodyPartExamined="CHEST"))
    assert decision.reason == (
        "no rule matched: rule brain-mr: SeriesDescription 'T2' does not match ~T1,"
        " BodyPartExamined 'CHEST' does not match ^(?:BRAIN|HEAD)$"
    )


def test_first_matching_rule_wins_and_every_rule_is_explained() -> None:
    rules = compile_rules([rule("ct", Modality="CT"), rule("mr-first", Modality="MR"), rule("catch-all")])
    decision = route_series(rules, header(Modality="MR"))
    assert decision.rule is not None and decision.rule.name == "mr-first"
    assert [(o.rule.name, o.matched) for o in decision.outcomes] == [
        ("ct", False),
        ("mr-first", True),
        ("catch-all", True),
    ]
    assert str(decision.outcomes[0]) == "rule ct: Modality 'MR' does not match ^(?:CT)$"
    assert decision.outcomes[2].detail == "matches every series (no patterns)"


def test_uncompiled_rules_are_accepted() -> None:
    assert route_series([rule("mr", Modality="MR")], header(Modality="MR")).matched


def test_no_rules() -> None:
    decision = route_series([], header(Modality="MR"))
    assert not decision.matched and decision.reason == "no rule matched: no routing rules are configured"


def test_patient_values_are_masked_in_reasons() -> None:
    decision = route_series(compile_rules([rule("vip", PatientName="Smith\\^.*")]), header(PatientName="Doe^Jane"))
    assert "Doe" not in decision.reason
    assert "PatientName <masked> does not match" in decision.reason
