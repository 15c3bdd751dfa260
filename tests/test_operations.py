"""Operations artefacts: the Prometheus rules pass promtool's checks and unit tests, every alert
carries what an on-call engineer needs (severity, summary, description, a runbook section that
exists) and has a firing and a near-miss case, and every metric the rules read is one lmfleet
exports (taken from the servers' own registries, not from a list kept by hand)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.cluster.ingress import ingress_families
from lmfleet.cluster.metrics_merge import render
from lmfleet.recsys.serve import RecsysMetrics, _Gauges
from lmfleet.serve.metrics import ServerMetrics
from lmfleet.train.exporter import TrainingExporter

from .helpers import require_tool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "lmfleet-rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "untyped": ("",)}


def exported_metric_names() -> set[str]:
    """Every sample name an lmfleet server, recommender or cluster endpoint can expose: what their
    registries declare and what their collectors yield."""
    status = dict(running=0, waiting=0, kv_cache_usage=0.0, prefix_queries=0, prefix_hits=0, preemptions=0,
                  prompt_tokens=0, generation_tokens=0)
    recsys = RecsysMetrics("m", 64)
    recsys.registry.register(_Gauges(SimpleNamespace(batcher=None, settings=SimpleNamespace(model_name="m"))))
    training = TrainingExporter("run", 100, 2, 1)
    for record in ({"kind": "train", "step": 1, "loss": 2.0, "tokens_per_s": 10.0, "mfu": 0.1, "tokens": 64,
                    "grad_norm": 1.0, "step_time_s": 0.1, "lr": 1e-3}, {"kind": "eval", "val_loss": 2.0},
                   {"kind": "checkpoint", "step": 1}):
        training.observe(record)
    registries = [ServerMetrics(lambda: status, "m").registry, recsys.registry, training.registry]
    rendered = [generate_latest(registry).decode() for registry in registries]
    rendered.append(render(ingress_families(2, 1, {"prefix_hit": 1, "retried": 1}, 0, {503: 1})).decode())
    # Metrics declared with labels have no sample until a label set is used: their declared names.
    names = {name for registry in registries for name in registry._names_to_collectors}
    for text in rendered:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                names.update(name + suffix for suffix in SAMPLE_SUFFIXES[kind])
        names.update(s.name for family in text_string_to_metric_families(text) for s in family.samples)
    return names


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers, less strings, label
    matchers, ranges, grouping clauses, functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\S+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in {"and", "or", "unless", "bool", "inf", "nan"}:
            continue
        names.add(match.group())
    return names


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_prometheus_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = require_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    assert RULE_TESTS
    tested = subprocess.run([promtool, "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS[0].parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_severity_annotations_a_runbook_and_a_firing_and_a_near_miss_case() -> None:
    alerts = [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 16
    sections = anchors(OPERATIONS.read_text())
    cases: dict[str, list[tuple[list[dict], list[dict]]]] = {}
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            series = [dict(re.findall(r'(\w+)="([^"]*)"', s["series"])) for s in test["input_series"]]
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append((series, case.get("exp_alerts") or []))
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor == name.lower() and anchor in sections, (name, notes)
        assert name in cases, f"{name} has no promtool case"
        fired = [alert["exp_labels"] for _, expected in cases[name] for alert in expected]
        assert fired, f"{name} never fires in its tests"
        quiet = any(not expected for _, expected in cases[name])  # an evaluation expecting no alert
        for series, expected in cases[name]:
            for labels in series:  # or an input series that no expected alert matches: a near miss
                keys = {k for alert in expected for k in alert["exp_labels"]} - {"severity", "alertname"}
                if expected and not any(all(labels.get(k) == str(a["exp_labels"].get(k, labels.get(k)))
                                            for k in keys) for a in expected):
                    quiet = True
        assert quiet, f"{name} has no case where it must stay quiet"


def test_every_metric_the_rules_read_is_one_lmfleet_exports() -> None:
    exported = exported_metric_names() | {"up"}
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    read = set()
    for group in rule_groups():
        for rule in group["rules"]:
            read |= metric_names_in(rule["expr"])
    assert read, "no metric names found"
    unknown = sorted(read - exported - recorded)
    assert unknown == [], f"the rules read metrics lmfleet does not export: {unknown}"
    # The extraction itself: it finds what it should and nothing else.
    assert metric_names_in('histogram_quantile(0.99, sum by (le) (rate(a:b_bucket{x="y"}[5m]))) > c') == {
        "a:b_bucket", "c"}
    assert metric_names_in("d < 0.5 * avg_over_time(d[1h] offset 15m) or abs(e) == +Inf and f != 1e3") == {"d", "e", "f"}
    assert {"lmfleet:min_replicas", "lmfleet_recsys:num_requests_waiting", "lmfleet_train:restarts_total",
            "lmfleet_train:checkpoint_age_seconds"} <= exported


def dashboard_exprs() -> dict[str, list[str]]:
    """Each dashboard's PromQL, Grafana's variables replaced by values Prometheus accepts."""
    out = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
        out[path.name] = [re.sub(r"\$__rate_interval", "5m", re.sub(r"\$(model_name|run)\b", ".*", e)) for e in exprs]
    return out


def test_dashboards_are_valid_promql_over_metrics_lmfleet_exports(tmp_path) -> None:
    assert {p.name for p in DASHBOARDS} == {"serving.json", "training.json"}
    exprs = dashboard_exprs()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] and board["panels"] and all(p["targets"] for p in board["panels"]), path.name
        assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"])  # any Prometheus
    # promtool parses every expression (as recording rules).
    rules = {"groups": [{"name": name, "rules": [{"record": f"dashboard:expr_{i}", "expr": e}
                                                 for i, e in enumerate(items)]} for name, items in exprs.items()]}
    (tmp_path / "dashboards.yml").write_text(yaml.safe_dump(rules))
    promtool = require_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboards.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    exported = exported_metric_names()
    read = {name for items in exprs.values() for e in items for name in metric_names_in(e)}
    assert not sorted(read - exported), f"dashboards read metrics lmfleet does not export: {sorted(read - exported)}"
    # What the issue asks the serving board to show, and the training board.
    for wanted in ("lmfleet:time_to_first_token_seconds_bucket", "lmfleet:inter_token_latency_seconds_bucket",
                   "lmfleet:num_requests_waiting", "lmfleet:kv_cache_usage_perc", "lmfleet:prefix_cache_hits_total",
                   "lmfleet:num_replicas", "lmfleet:http_errors_total", "lmfleet:generation_tokens_total"):
        assert any(wanted in e for e in exprs["serving.json"]), wanted
    for wanted in ("lmfleet_train:loss", "lmfleet_train:tokens_per_second", "lmfleet_train:mfu"):
        assert any(wanted in e for e in exprs["training.json"]), wanted


K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def k8s_objects() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in K8S for doc in yaml.safe_load_all(path.read_text())
            if doc}


def test_kubernetes_manifests_validate_strictly_and_fit_together() -> None:
    import shutil
    import sys

    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).with_name("kubernetes-validate"))
    result = subprocess.run([exe, "--strict", *map(str, K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "passed" in result.stdout, result.stdout + result.stderr
    objects = k8s_objects()
    claims = {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    # Serving: the CLI, the probes and the key file, the volume, the autoscaler's metric.
    serve = objects[("Deployment", "lmfleet-serve")]["spec"]["template"]["spec"]
    container = serve["containers"][0]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    assert {p["containerPort"] for p in container["ports"]} == {port}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in serve["volumes"]}
    key_file = args[args.index("--api-key-file") + 1]
    assert key_file.startswith(mounts["api-keys"] + "/") and "secret" in volumes["api-keys"]
    assert args[1].startswith(mounts["models"] + "/") and volumes["models"]["persistentVolumeClaim"]["claimName"] in claims
    assert serve["securityContext"]["runAsNonRoot"] is True
    hpa = objects[("HorizontalPodAutoscaler", "lmfleet-serve")]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "lmfleet:num_requests_waiting".replace(":", "_")
    assert "lmfleet:num_requests_waiting" in exported_metric_names()
    service = objects[("Service", "lmfleet")]["spec"]
    assert service["selector"] == objects[("Deployment", "lmfleet-serve")]["spec"]["selector"]["matchLabels"]
    # Training: node count, the rendezvous on pod 0 through the headless Service, shared volumes.
    job = objects[("Job", "lmfleet-train")]
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "train" and job["spec"]["completionMode"] == "Indexed"
    assert int(args[args.index("--nnodes") + 1]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    host, _, rdzv_port = args[args.index("--rdzv-endpoint") + 1].partition(":")
    headless = objects[("Service", pod["subdomain"])]["spec"]
    assert host == f"lmfleet-train-0.{pod['subdomain']}" and headless["clusterIP"] == "None"
    assert int(rdzv_port) in {p["port"] for p in headless["ports"]}
    assert args[args.index("--node-rank") + 1] == "$(NODE_RANK)"
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims


def test_dockerfiles_copy_what_exists_and_run_the_cli_unprivileged() -> None:
    import tomllib

    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "lmfleet" in scripts
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text()
        instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                        if line.strip() and not line.lstrip().startswith("#")]
        copies = [rest.split() for op, rest in instructions if op == "COPY" and "--from=" not in rest]
        assert copies, name
        for parts in copies:
            for source in parts[:-1]:  # relative to the build context, the repository root
                assert (ROOT / source).exists(), (name, source)
                assert source.rstrip("/") not in ignored, (name, source)
        assert [rest for op, rest in instructions if op == "ENTRYPOINT"] == ['["lmfleet"]'], name
        user = [rest for op, rest in instructions if op == "USER"]
        assert user and user[-1] not in ("root", "0"), name
        assert any(op == "HEALTHCHECK" and "/health" in rest for op, rest in instructions), name
        assert sum(op == "FROM" for op, _ in instructions) == 2, name  # build stage, runtime stage
