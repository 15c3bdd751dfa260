"""Operations artefacts: the Prometheus rules pass promtool's checks and unit tests, every alert
carries what an on-call engineer needs (severity, summary, description, a runbook section that
exists) and has a firing and a near-miss case, and every metric the rules read is one lmfleet
exports (taken from the servers' own registries, not from a list kept by hand)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.cluster.ingress import ingress_families
from lmfleet.cluster.metrics_merge import render
from lmfleet.recsys.serve import RecsysMetrics, _Gauges
from lmfleet.serve.metrics import ServerMetrics
from lmfleet.train.exporter import TrainingExporter

from .helpers import chat_model_dir, free_port, require_tool, wait_healthy

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
    rendered.append(render(ingress_families(2, 1, {"prefix_hit": 1, "retried": 1}, 0, {503: 1}, 3, "m")).decode())
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


RAYSERVICE = ROOT / "deploy" / "k8s" / "rayservice.yaml"
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
CRD_GROUPS = ("ray.io/",)  # KubeRay's kinds: no schema ships with kubernetes-validate; checked field by field


def k8s_objects() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in K8S for doc in yaml.safe_load_all(path.read_text())
            if doc}


def kubernetes_validate(docs: list[dict], path: Path) -> None:
    """`kubernetes-validate --strict` on `docs` (written to `path`): every field known to its schema."""
    import shutil

    path.write_text(yaml.safe_dump_all(docs))
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).with_name("kubernetes-validate"))
    result = subprocess.run([exe, "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "passed" in result.stdout, result.stdout + result.stderr


def test_kubernetes_manifests_validate_strictly_and_fit_together(tmp_path) -> None:
    objects = k8s_objects()
    plain = [doc for doc in objects.values() if not doc["apiVersion"].startswith(CRD_GROUPS)]
    assert len(plain) == len(objects) - 1  # all but the RayService
    kubernetes_validate(plain, tmp_path / "plain.yaml")
    claims = {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    # Claims that pods on several nodes mount at once (serving replicas, Ray pods, training nodes).
    for name in claims:
        modes = objects[("PersistentVolumeClaim", name)]["spec"]["accessModes"]
        assert set(modes) & {"ReadWriteMany", "ReadOnlyMany"}, (name, modes)
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


# ---- the whole path, live: lmfleet -> Prometheus -> Alertmanager -> a pager's webhook ------------

class _Webhook(http.server.BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: keeps every notification's JSON."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server method name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _prometheus_query(url: str, query: str) -> list[dict]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _scraped_names(url: str, selector: str) -> set[str]:
    """The names of the series Prometheus scraped from the targets `selector` picks (less its own:
    up, scrape_*, and ALERTS* carrying the target's labels)."""
    answer = httpx.get(f"{url}/api/v1/series", params={"match[]": selector}, timeout=10).json()
    assert answer["status"] == "success", answer
    return {series["__name__"] for series in answer["data"]
            if series["__name__"] != "up" and not series["__name__"].startswith(("scrape_", "ALERTS"))}


def _wait_for(what: str, check, timeout_s: float, procs: dict):
    """Poll `check()` until it returns something truthy; fails naming `what` after `timeout_s`, or
    at once when a process of `procs` (those that must keep running) exits, with its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        dead = {name: proc.returncode for name, (proc, _) in procs.items() if proc.poll() is not None}
        assert time.monotonic() < deadline and not dead, (
            f"{what}: not seen in {timeout_s:.0f} s; exited: {dead}; "
            + " | ".join(f"{n}: {Path(log).read_text()[-1500:]}" for n, (_, log) in procs.items() if n in dead))
        time.sleep(0.5)


def _documented_training_metrics() -> set[str]:
    """The lmfleet_train:* names docs/operations.md's table promises."""
    return set(re.findall(r"`(lmfleet_train:[a-z_]+)`", OPERATIONS.read_text()))


# What ARCHITECTURE.md and docs/serving.md name for every server (vLLM's meaning, lmfleet's prefix).
SERVING_SERIES = {"lmfleet:num_requests_running", "lmfleet:num_requests_waiting", "lmfleet:kv_cache_usage_perc",
                  "lmfleet:prefix_cache_queries_total", "lmfleet:prefix_cache_hits_total",
                  "lmfleet:prompt_tokens_total", "lmfleet:generation_tokens_total",
                  "lmfleet:time_to_first_token_seconds_bucket", "lmfleet:inter_token_latency_seconds_bucket",
                  "lmfleet:e2e_request_latency_seconds_bucket", "lmfleet:request_queue_time_seconds_bucket",
                  "lmfleet:request_success_total", "lmfleet:num_preemptions_total"}


@pytest.mark.integration
def test_live_prometheus_scrapes_lmfleet_and_an_instance_down_page_reaches_the_webhook(tmp_path, tokenizer) -> None:
    """A real Prometheus (1 s scrapes and evaluations, lmfleet's rules) and Alertmanager watch a
    `lmfleet serve`, a `--replicas 2` cluster endpoint and a training run: every documented series is
    scraped under its name, and when the single server stops, LmfleetInstanceDown fires for it, and
    only for it, and Alertmanager's notification reaches the test's webhook receiver. The rule's
    1 min `for` is shortened to 10 s in the copy Prometheus loads; its expression, labels and
    annotations are the shipped ones."""
    from lmfleet.data.corpus import prepare_corpus, stdlib_root

    prometheus = require_tool("prometheus", "prometheus")
    alertmanager = require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    model_dir = chat_model_dir(tmp_path, tokenizer, 512, 7)
    corpus = tmp_path / "corpus"
    prepare_corpus([str(stdlib_root() / "json")], corpus, vocab_size=512, val_fraction=0.1)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    _Webhook.received = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(name: str, command: list[str]) -> None:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as sink:  # its own process group: a fallback kill takes what it started too
            procs[name] = (subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True),
                           log)

    lmfleet = str(Path(sys.executable).with_name("lmfleet"))
    tokens: dict[str, int] = {}
    try:
        urls = {}
        for name, extra in (("server", []), ("cluster", ["--replicas", "2"])):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            start(name, [lmfleet, "serve", str(model_dir), "--port", str(port), "--kv-cache-memory", "4MiB",
                         "--served-model-name", "tiny", *extra])
        for name, url in urls.items():
            proc, log = procs[name]
            wait_healthy(url, proc, 240, log.read_text)
        server, (server_url, cluster_url) = procs["server"][0], urls.values()
        for url in (server_url, cluster_url):
            tokens[url] = 0
            for prompt in ("The quick brown", "def add(a, b):", "Data flows"):
                answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                                   "max_tokens": 6}, timeout=60)
                assert answer.status_code == 200, answer.text
                tokens[url] += answer.json()["usage"]["completion_tokens"]
        train_port, prom_port, am_port = free_port(), free_port(), free_port()
        start("training", [sys.executable, "-m", "lmfleet.cli", "train", str(ROOT / "configs" / "debug.toml"),
                           "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "100000",
                           "--checkpoint-every", "100000", "--nproc", "1", "--metrics-port", str(train_port)])
        rules = yaml.safe_load(RULES.read_text())
        down = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "LmfleetInstanceDown")
        down["for"] = "10s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        target = lambda url: url.removeprefix("http://")  # noqa: E731
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [
                {"job_name": "lmfleet", "static_configs": [{"targets": [target(server_url), target(cluster_url)]}]},
                {"job_name": "lmfleet-train", "static_configs": [{"targets": [f"127.0.0.1:{train_port}"]}]}]}))
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "pager", "group_by": ["alertname", "instance"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "pager", "webhook_configs": [
                {"url": f"http://127.0.0.1:{hook.server_address[1]}/alerts", "send_resolved": False}]}]}))
        start("alertmanager", [alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}",
                               f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                               "--cluster.listen-address="])
        start("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"])
        prom = f"http://127.0.0.1:{prom_port}"

        def ready():
            try:
                return httpx.get(f"{prom}/-/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for("Prometheus ready", ready, 60, {n: procs[n] for n in ("prometheus", "alertmanager")})

        def up(instance: str):
            return _prometheus_query(prom, f'up{{instance="{instance}"}} == 1')

        # Training: its series once it has stepped while scraped; then SIGTERM ends it (checkpoint, exit 0).
        _wait_for("a scraped training step", lambda: up(f"127.0.0.1:{train_port}") and _prometheus_query(
            prom, 'lmfleet_train:step{job="lmfleet-train"} > 0'), 180, procs)
        running = {n: procs[n] for n in ("cluster", "prometheus", "alertmanager")}
        trainer = procs["training"][0]
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=120) == 0, procs["training"][1].read_text()[-3000:]
        training_names = _scraped_names(prom, '{job="lmfleet-train"}')
        for url in (server_url, cluster_url):
            _wait_for(f"{url} scraped", lambda url=url: up(target(url)), 60, running)
        time.sleep(2)  # the answers' counters and histograms in at least one scrape after they moved
        exported = exported_metric_names()
        for url in (server_url, cluster_url):
            names = _scraped_names(prom, f'{{instance="{target(url)}"}}')
            assert SERVING_SERIES <= names, (url, sorted(SERVING_SERIES - names))
            assert names <= exported, sorted(names - exported)
        assert _documented_training_metrics() <= training_names, sorted(_documented_training_metrics() - training_names)
        assert training_names <= exported, sorted(training_names - exported)
        # The cluster endpoint: both replicas' series under a `replica` label, and its replica count.
        replicas = _prometheus_query(prom, f'lmfleet:generation_tokens_total{{instance="{target(cluster_url)}"}}')
        assert len({r["metric"]["replica"] for r in replicas}) == 2, replicas
        assert sum(float(r["value"][1]) for r in replicas) == tokens[cluster_url]
        count = _prometheus_query(prom, f'lmfleet:num_replicas{{instance="{target(cluster_url)}"}}')
        assert [float(r["value"][1]) for r in count] == [2.0]
        served = _prometheus_query(prom, f'lmfleet:generation_tokens_total{{instance="{target(server_url)}"}}')
        assert [float(r["value"][1]) for r in served] == [tokens[server_url]]
        # The single server goes away: its instance-down page reaches the webhook, nothing else pages.
        assert not [a for note in _Webhook.received for a in note["alerts"]
                    if a["labels"]["alertname"] == "LmfleetInstanceDown"], _Webhook.received
        _Webhook.received.clear()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

        def paged():
            return [a for note in _Webhook.received for a in note["alerts"]
                    if a["labels"]["alertname"] == "LmfleetInstanceDown"]

        alerts = _wait_for("the LmfleetInstanceDown notification", paged, 90, running)
        assert {a["labels"]["instance"] for a in alerts} == {target(server_url)}, alerts
        alert = alerts[0]
        assert alert["status"] == "firing" and alert["labels"]["severity"] == "critical"
        assert alert["labels"]["job"] == "lmfleet"
        assert alert["annotations"]["runbook_url"] == "docs/operations.md#lmfleetinstancedown"
        assert target(server_url) in alert["annotations"]["summary"]
        assert up(target(cluster_url)), "the cluster endpoint must still be up"
    finally:
        hook.shutdown()
        hook.server_close()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the process and what it started (Ray's daemons)
                proc.wait()


def test_the_rayservice_deploys_lmfleets_builder_with_args_it_accepts_on_pods_that_validate(tmp_path) -> None:
    """deploy/k8s/rayservice.yaml, field by field where KubeRay and lmfleet rely on them: its
    serveConfigV2 names lmfleet's application builder with args the builder accepts, on the route
    and port the pods expose; the pod templates are valid Kubernetes (strict) and mount the model
    and key paths the args name from claims and a Secret that exist; its Ray is one lmfleet supports."""
    import importlib
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    from lmfleet.cluster.application import build, parse_args
    from lmfleet.cluster.deploy import APP_NAME

    (service,) = [doc for doc in yaml.safe_load_all(RAYSERVICE.read_text()) if doc and doc["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    assert set(service["spec"]) == {"serveConfigV2", "rayClusterConfig"}  # no misspelt field beside them
    assert set(service["spec"]["rayClusterConfig"]) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec",
                                                        "workerGroupSpecs", "autoscalerOptions"}
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"  # what `lmfleet status` looks for
    module, _, attr = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attr) is build
    args = parse_args(app["args"])  # refuses an unknown or ill-typed field by name
    assert args.api_key_file and not args.allow_unauthenticated
    http_port = serve_config["http_options"]["port"]
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    cluster = service["spec"]["rayClusterConfig"]
    ray_spec = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                    ["cluster"] if r.startswith("ray"))
    assert Requirement(ray_spec).specifier.contains(cluster["rayVersion"]), (ray_spec, cluster["rayVersion"])
    assert cluster["rayVersion"] == importlib.metadata.version("ray")  # the Ray the tests ran: update both together
    claims = {name for kind, name in k8s_objects() if kind == "PersistentVolumeClaim"}
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    templates = []
    for name, group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].startswith("lmfleet:") and pod["securityContext"]["runAsNonRoot"] is True, name
        for probe in ("readinessProbe", "livenessProbe"):  # over HTTP: the image has no wget for KubeRay's own
            assert "httpGet" in container[probe], (name, probe)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert args.model_dir.startswith(mounts["models"] + "/"), name
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] in claims, name
        assert args.api_key_file.startswith(mounts["api-keys"] + "/") and "secret" in volumes["api-keys"], name
        if name != "head":  # model replicas run on the workers: their CPUs fit one, the Serve proxy port is open
            assert float(group["rayStartParams"]["num-cpus"]) >= args.cpus_per_replica
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert container["readinessProbe"]["httpGet"]["port"] == http_port
        assert http_port in {p["containerPort"] for p in container["ports"]}, name
        templates.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"lmfleet-ray-{name}"},
                          "template": group["template"]})
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    _, hi = map(int, args.autoscale.split(":"))
    assert hi <= sum(g["maxReplicas"] for _, g in groups[1:])
    kubernetes_validate(templates, tmp_path / "pods.yaml")
    # The network policy covers the pods of both groups: Ray's ports from each other only.
    policy = k8s_objects()[("NetworkPolicy", "lmfleet-ray")]["spec"]
    (selected,) = policy["podSelector"]["matchExpressions"]
    assert {g["template"]["metadata"]["labels"][selected["key"]] for _, g in groups} == set(selected["values"])
