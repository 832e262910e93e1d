"""The vocabulary: each word declared once, and what reads it agrees."""

import json

import pytest

from mlbench_daemon import metrics, openapi, store
from mlbench_daemon.discovery import REASONS, DiscoveryError
from mlbench_daemon.vocabulary import FINAL_STATES, JobReason, JobState, Phase, checked

pytestmark = pytest.mark.logic


def test_final_states():
    assert [s for s in JobState if s.is_final] == ["succeeded", "failed", "cancelled", "lost"]
    assert FINAL_STATES == tuple(s for s in JobState if s.is_final)
    assert not JobState("pending").is_final and not JobState.RUNNING.is_final


def test_members_are_their_strings_in_json_and_text():
    assert json.dumps({"state": JobState.LOST, "phase": Phase.RUNNING}) == (
        '{"state": "lost", "phase": "Running"}'
    )
    assert f"{JobReason.TIMEOUT}" == str(JobReason.TIMEOUT) == "timeout"


def test_store_metrics_and_schema_use_the_same_words():
    assert store.STATES == tuple(JobState)
    schemas = openapi.SCHEMAS
    assert schemas["JobState"]["enum"] == [s.value for s in JobState]
    metrics.set_gauges([], {"lost": 2})
    text = metrics.render()[0].decode()
    for state in JobState:
        assert f'mlbench_daemon_jobs{{state="{state}"}}' in text
    for phase in Phase:
        assert f'mlbench_daemon_nodes{{phase="{phase}"}}' in text


def test_a_bad_reason_is_a_value_error():
    with pytest.raises(ValueError, match="unknown reason 'nope'"):
        checked("nope", ("a", "b"), "thing")
    with pytest.raises(ValueError):
        DiscoveryError("not-discovered-yet", "only the registry says this")
    assert DiscoveryError(REASONS[0], "x").reason == REASONS[0]
