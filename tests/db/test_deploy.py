"""deploy/: the Grafana dashboard and the Prometheus alert rules load, and every metric they
name is one the worker really exposes (scraped from a registry over a real database)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID
from worker import health
from worker.account import DbGate
from worker.clock import FakeClock
from worker.metrics import Metrics, build_registry
from worker.repository import Repository
from worker.tracking import Outcome, PollCounts

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "optrack-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "optrack-alerts.yml"
METRIC = re.compile(r"\boptrack_[a-z0-9_]+")
GOOD = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["panels"]
    assert doc["__inputs"][0]["pluginId"] == "prometheus"  # importable: asks for its source
    exprs = []
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    return exprs


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    found = [rule for group in doc["groups"] for rule in group["rules"]]
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"].startswith("Optrack") and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    return found


def exposed_names(sessions: sessionmaker[Session], clock: FakeClock) -> set[str]:
    """Every sample name a scrape shows once each kind of thing has happened once."""
    metrics = Metrics()
    metrics.answered("fetch", 200)
    metrics.paused(3.0, 429)
    counts = PollCounts.empty()
    counts.add(Outcome.CHANGED)
    counts.history_rows = 1
    metrics.observe_polls(counts)
    metrics.discovered.inc()
    metrics.notices.labels("delivered").inc()
    metrics.pruned.inc()
    with sessions.begin() as session:
        Repository(session).add([GOOD], clock.now())
        health.beat_ticked(session, clock.now())
    DbGate(sessions.kw["bind"], SID, clock).pause(clock.now() + timedelta(seconds=5), "429", 429)
    registry = build_registry(sessions, clock, multiproc_dir=None, local=metrics, account_sid=SID)
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_alert_rules_cover_what_operators_asked_for() -> None:
    exprs = " ".join(rule["expr"] for rule in rules())
    for metric in (
        "optrack_processing_unchanged_seconds",  # stuck operations
        "optrack_poll_lag_seconds",  # polling lag
        "optrack_account_paused",  # paused longer than N minutes (`for:`)
        "optrack_credentials_rejected",
        "optrack_dead_letters",
    ):
        assert metric in exprs, metric
    paused = next(r for r in rules() if r["alert"] == "OptrackAccountPausedLong")
    assert paused["for"] == "10m"


def test_every_metric_in_deploy_exists(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    named = {
        m for expr in dashboard_exprs() + [r["expr"] for r in rules()] for m in METRIC.findall(expr)
    }
    assert len(named) >= 12
    exposed = exposed_names(sessions, clock)
    assert named - exposed == set(), f"not exposed by the worker: {sorted(named - exposed)}"


def test_the_dashboard_filters_the_per_account_panels_by_an_account_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    [variable] = doc["templating"]["list"]
    assert variable["name"] == "account" and variable["includeAll"] and variable["multi"]
    assert "optrack_account_active_operations" in variable["query"]["query"]
    per_account = (
        "optrack_account_active_operations",
        "optrack_account_paused",
        "optrack_credentials_rejected",
        "optrack_api_responses_total",
        "optrack_account_pauses_total",
    )
    exprs = dashboard_exprs()
    for metric in per_account:
        uses = [e for e in exprs if metric in e]
        assert uses, metric
        assert all(f'{metric}{{account=~"$account"}}' in e for e in uses), (metric, uses)
