"""Rule file schema and validation: every problem has its line, key path and a fix."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from node.cli.rules import CheckArgs, cmd_check
from node.config import (
    DicomDestination,
    Rules,
    check_bundles_exist,
    load_rules,
    summarise_rules,
    validate_rules_text,
)
from node.errors import ConfigError
from node.records import SequenceLabel

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "routing_rules" / "default.yaml"
EXAMPLES = sorted((REPO / "routing_rules" / "examples").glob("*.yaml"))
ALL_FILES = [DEFAULT, *EXAMPLES]

TASK = """\
tasks:
  gbm_pcnsl:
    positive_label: glioblastoma
    negative_label: primary CNS lymphoma
    models:
      - bundle: t1c
        sequences: [T1C]
        weight: 1.0
"""


def problems_of(text: str) -> dict[str, tuple[int | None, str, str | None]]:
    rules, problems = validate_rules_text(text)
    assert rules is None, "expected the text to be rejected"
    return {p.path: (p.line, p.message, p.fix) for p in problems}


def all_bundles(rules: Rules) -> set[str]:
    return {rules.sequence.bundle} | {m.bundle for t in rules.tasks.values() for m in t.models}


# --- shipped files ---------------------------------------------------------------------------


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_shipped_rule_files_pass_check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = CheckArgs(rules_file=path, skip_bundle_check=True)
    assert cmd_check(args) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert "AE title" in out and "Tasks:" in out


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_shipped_rule_files_pass_bundle_check_when_bundles_exist(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full `neuronode check` (with the bundle check) on a copy beside a models/ of every bundle."""
    rules = load_rules(path)
    rel = path.relative_to(REPO)
    copy = tmp_path / rel
    copy.parent.mkdir(parents=True)
    text = path.read_text()
    if "/etc/neuronode/tls/" in text:  # the TLS files must exist too: make them here
        (tmp_path / "tls").mkdir()
        for name in ("ca.pem", "node.pem", "node.key"):
            (tmp_path / "tls" / name).write_text("PEM\n")
        text = text.replace("/etc/neuronode/tls/", f"{tmp_path}/tls/")
    copy.write_text(text)
    for bundle in all_bundles(rules):
        (tmp_path / "models" / bundle).mkdir(parents=True, exist_ok=True)
    assert cmd_check(CheckArgs(rules_file=copy, skip_bundle_check=False)) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_shipped_rule_files_name_bundles_that_are_in_the_repository(path: Path) -> None:
    models = REPO / "models"
    if not models.is_dir() or not any(p.is_dir() for p in models.iterdir()):
        pytest.skip("no bundles in models/ yet")
    rules = load_rules(path)
    assert check_bundles_exist(rules, path.parent) == ()


def test_every_key_of_the_schema_is_in_default_yaml() -> None:
    """default.yaml is what IT reads: it must show every section and every task key."""
    text = DEFAULT.read_text()
    for key in Rules.model_fields:
        assert f"\n{key}:" in text or text.startswith(f"{key}:"), key
    for section in ("node", "completion", "processing", "sequence", "qualify", "delivery"):
        model = type(getattr(Rules(), section))
        for key in model.model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from default.yaml"
    for key in ("enabled", "positive_label", "negative_label", "models", "method"):
        assert f"    {key}:" in text
    assert "temperature:" in text and "indeterminate_band:" in text and "weight:" in text


def test_default_yaml_matches_schema_defaults() -> None:
    rules = load_rules(DEFAULT)
    defaults = Rules()
    assert rules.tasks == defaults.tasks
    assert rules.sequence == defaults.sequence
    assert rules.qualify == defaults.qualify
    assert rules.completion == defaults.completion
    assert rules.delivery == defaults.delivery
    assert rules.models_dir == REPO / "models"


def test_load_rules_resolves_models_dir_against_the_file(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "rules.yaml"
    f.parent.mkdir()
    f.write_text("models_dir: ../bundles\n")
    assert load_rules(f).models_dir == tmp_path / "bundles"
    f.write_text(f"models_dir: {tmp_path / 'abs'}\n")
    assert load_rules(f).models_dir == tmp_path / "abs"


def test_default_schema_tasks_and_routes() -> None:
    rules = Rules()
    assert list(rules.tasks) == ["tumour", "gbm_pcnsl", "glioma_grade", "tubers"]
    assert rules.tasks["tumour"].requires_lesion is None
    assert rules.tasks["glioma_grade"].requires_lesion == "tumour"
    gbm = rules.tasks["gbm_pcnsl"]
    assert gbm.positive_label == "glioblastoma" and gbm.requires_lesion == "tumour"
    assert [(m.bundle, m.sequences, m.weight) for m in gbm.models] == [
        ("gbm_pcnsl_t1c", (SequenceLabel.T1C,), 0.81),
        ("gbm_pcnsl_adc", (SequenceLabel.ADC,), 1.0),
    ]
    assert gbm.indeterminate_band == (0.35, 0.65)
    assert rules.sequence.disagreement == "other"
    assert rules.qualify.modalities == ("MR",)


# --- problems: line, path, fix -------------------------------------------------------------------


def test_unknown_key_suggests_the_nearest() -> None:
    probs = problems_of("completion:\n  quiet_periode_s: 3\n")
    line, msg, fix = probs["completion.quiet_periode_s"]
    assert line == 2
    assert "did you mean 'quiet_period_s'?" in msg
    assert fix == "quiet_period_s: ..."


def test_unknown_key_inside_a_destination_lists_the_keys() -> None:
    text = "destinations:\n  - kind: dicom\n    name: p\n    ae_title: P\n    host: h\n"
    text += "    port: 104\n    colour: red\n"
    line, msg, fix = problems_of(text)["destinations.0.colour"]
    assert line == 7 and "unknown key 'colour'" in msg
    assert fix is not None and "ae_title" in fix and "tls" in fix


def test_unknown_key_in_a_task_route() -> None:
    text = TASK.replace("weight: 1.0", "wieght: 1.0")
    line, msg, fix = problems_of(text)["tasks.gbm_pcnsl.models.0.wieght"]
    assert line == 8 and "did you mean 'weight'" in msg and fix == "weight: ..."


def test_unknown_top_level_key() -> None:
    line, msg, _ = problems_of("version: 1\nroutes: []\n")["routes"]
    assert line == 2 and "unknown key 'routes'" in msg


def test_bad_enum_lists_allowed_values() -> None:
    line, msg, fix = problems_of("sequence:\n  disagreement: maybe\n")["sequence.disagreement"]
    assert line == 2 and "'maybe'" in msg
    assert fix == "one of other, prefer_tags or prefer_cnn"
    _, _, fix = problems_of(TASK + "    method: average\n")["tasks.gbm_pcnsl.method"]
    assert fix is not None and "weighted_mean_logit" in fix and "max_weight" in fix


def test_bad_sequence_label_lists_routable_labels() -> None:
    line, _, fix = problems_of(TASK.replace("[T1C]", "[T1X]"))[
        "tasks.gbm_pcnsl.models.0.sequences.0"
    ]
    assert line == 7
    assert fix == "one of T1, T1C, T2, FLAIR, DWI, ADC"


def test_other_is_never_routed() -> None:
    line, msg, _ = problems_of(TASK.replace("[T1C]", "[T1C, OTHER]"))[
        "tasks.gbm_pcnsl.models.0.sequences"
    ]
    assert line == 7 and "never routed" in msg


@pytest.mark.parametrize("band", ["[0.7, 0.3]", "[0.0, 0.5]", "[0.5, 1.0]", "[0.5, 0.5]"])
def test_indeterminate_band_must_be_ordered_inside_0_1(band: str) -> None:
    line, msg, fix = problems_of(TASK + f"    indeterminate_band: {band}\n")[
        "tasks.gbm_pcnsl.indeterminate_band"
    ]
    assert line == 9 and "0 < low < high < 1" in msg
    assert fix is not None and "[0.35, 0.65]" in fix


def test_good_band_accepted() -> None:
    rules, problems = validate_rules_text(TASK + "    indeterminate_band: [0.2, 0.9]\n")
    assert problems == () and rules is not None
    assert rules.tasks["gbm_pcnsl"].indeterminate_band == (0.2, 0.9)


@pytest.mark.parametrize("weight", ["0", "-1"])
def test_weight_must_be_positive(weight: str) -> None:
    line, _, fix = problems_of(TASK.replace("weight: 1.0", f"weight: {weight}"))[
        "tasks.gbm_pcnsl.models.0.weight"
    ]
    assert line == 8 and fix == "a number greater than 0"


def test_temperature_must_be_positive() -> None:
    _, _, fix = problems_of(TASK + "    temperature: 0\n")["tasks.gbm_pcnsl.temperature"]
    assert fix == "a number greater than 0"


def test_task_without_labels_or_models() -> None:
    probs = problems_of("tasks:\n  t:\n    models: []\n")
    assert "required key 'positive_label' is missing" in probs["tasks.t.positive_label"][1]
    assert probs["tasks.t.models"][2] == "at least 1 item(s)"


def test_bundle_twice_in_one_task() -> None:
    text = TASK + "      - bundle: t1c\n        sequences: [T1]\n"
    line, msg, fix = problems_of(text)["tasks.gbm_pcnsl.models.1.bundle"]
    assert line == 9 and "listed twice" in msg and fix is not None and "sequences" in fix


def test_task_name_must_be_an_identifier() -> None:
    probs = problems_of(TASK.replace("gbm_pcnsl:", "GBM vs PCNSL:"))
    assert "GBM vs PCNSL" in next(iter(probs))


def test_destination_names_unique() -> None:
    text = """\
destinations:
  - {kind: dicom, name: pacs, ae_title: PACS, host: 10.0.0.1, port: 104}
  - {kind: dicomweb, name: pacs, url: http://10.0.0.2/dicom-web}
"""
    line, msg, fix = problems_of(text)["destinations.1.name"]
    assert line == 3 and "already used" in msg and fix is not None and "pacs_2" in fix


def test_destination_kind_must_be_known() -> None:
    text = "destinations:\n  - {kind: ftp, name: x}\n"
    probs = problems_of(text)
    (path,) = probs
    assert path.startswith("destinations.0")
    assert probs[path][0] == 2 and "dicomweb" in (probs[path][2] or "")


@pytest.mark.parametrize("ae", ["THIS_IS_TOO_LONG_AE", "BAD\\AE", " LEAD", ""])
def test_ae_titles_validated(ae: str) -> None:
    line, msg, fix = problems_of(f"node:\n  ae_title: '{ae}'\n")["node.ae_title"]
    assert line == 2 and "AE title" in msg and fix is not None and "ORTHANC" in fix


def test_destination_ae_title_validated() -> None:
    text = "destinations:\n  - {kind: dicom, name: p, ae_title: WAY_TOO_LONG_AE_TITLE, "
    text += "host: 10.0.0.1, port: 104}\n"
    assert "AE title" in problems_of(text)["destinations.0.ae_title"][1]


@pytest.mark.parametrize("host", ["10.0.0.300", "pacs_main", "-bad.example", "a b", "1.2.3"])
def test_caller_host_must_be_ip_or_hostname(host: str) -> None:
    text = f"node:\n  allowed_callers:\n    - ae_title: X\n      host: '{host}'\n"
    line, msg, fix = problems_of(text)["node.allowed_callers.0.host"]
    assert line == 4 and "neither an IP address nor a host name" in msg
    assert fix is not None and "10.1.2.3" in fix


@pytest.mark.parametrize(
    "host", ["10.0.0.3", "::1", "pacs", "pacs-1.hospital.local", "PACS.local."]
)
def test_good_hosts_accepted(host: str) -> None:
    text = f"node:\n  allowed_callers:\n    - ae_title: X\n      host: '{host}'\n"
    rules, problems = validate_rules_text(text)
    assert problems == () and rules is not None
    assert rules.node.allowed_callers[0].host == host


def test_destination_host_and_url_validated() -> None:
    text = "destinations:\n  - {kind: dicom, name: p, ae_title: P, host: 'x y', port: 104}\n"
    text += "  - {kind: dicomweb, name: w, url: 'ftp://pacs/dicom-web'}\n"
    probs = problems_of(text)
    assert probs["destinations.0.host"][0] == 2
    assert probs["destinations.1.url"][0] == 3
    assert "http" in (probs["destinations.1.url"][2] or "")


def test_bind_address_must_be_ip() -> None:
    _, _, fix = problems_of("node:\n  bind_address: localhost\n")["node.bind_address"]
    assert fix is not None and "0.0.0.0" in fix


def test_uid_root_checked() -> None:
    line, _, fix = problems_of("outputs:\n  uid_root: 1.2.03.x\n")["outputs.uid_root"]
    assert line == 2 and fix is not None and "2.25" in fix


def test_caller_with_our_own_ae_title() -> None:
    text = "node:\n  ae_title: NODE\n  allowed_callers:\n    - ae_title: NODE\n"
    line, msg, _ = problems_of(text)["node.allowed_callers.0.ae_title"]
    assert line == 4 and "own AE title" in msg


def test_type_errors_have_fixes() -> None:
    probs = problems_of("node:\n  port: eleven\ncompletion:\n  use_expected_counts: maybe\n")
    assert probs["node.port"][2] == "a whole number"
    assert probs["completion.use_expected_counts"][2] == "true or false"


def test_repeated_key_is_a_problem() -> None:
    line, msg, _ = problems_of("node:\n  port: 1000\n  port: 2000\n")["node.port"]
    assert line == 3 and "twice" in msg


def test_invalid_yaml_has_line() -> None:
    rules, problems = validate_rules_text("node:\n  port: [1,\n")
    assert rules is None and problems[0].line is not None and "YAML" in problems[0].message


def test_not_a_mapping() -> None:
    rules, problems = validate_rules_text("- a\n- b\n")
    assert rules is None and problems[0].message == "the file must be a mapping of keys"


def test_empty_file_is_all_defaults() -> None:
    rules, problems = validate_rules_text("")
    assert problems == () and rules == Rules()


def test_every_problem_is_reported_at_once() -> None:
    text = "node:\n  port: 0\n  ae_titel: X\nsequence:\n  min_confidence: 2\n"
    assert set(problems_of(text)) == {"node.port", "node.ae_titel", "sequence.min_confidence"}


def test_existing_sections_unchanged() -> None:
    text = """\
destinations:
  - {kind: dicom, name: pacs, ae_title: ORTHANC, host: 127.0.0.1, port: 4242, tls: false}
  - {kind: dicomweb, name: web, url: 'http://127.0.0.1:8042/dicom-web'}
delivery: {max_attempts: 3, backoff_initial_s: 0.1, backoff_max_s: 1, jitter_fraction: 0}
outputs: {structured_report: false, heatmaps_per_series: 0, uid_root: 1.2.3}
"""
    rules, problems = validate_rules_text(text)
    assert problems == () and rules is not None
    assert isinstance(rules.destinations[0], DicomDestination)
    assert rules.destinations[1].kind == "dicomweb"
    assert rules.delivery.max_attempts == 3 and rules.outputs.uid_root == "1.2.3"


# --- load_rules, check, bundles ---------------------------------------------------------------


def test_load_rules_raises_config_error_naming_file_line_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("node:\n  port: 70000\n")
    with pytest.raises(ConfigError) as info:
        load_rules(f)
    assert str(info.value) == (
        f"{f}:2: node.port: Input should be less than or equal to 65535"
        " (write instead: a number of at most 65535)"
    )


def test_load_rules_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_cmd_check_prints_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("node:\n  port: 0\ncompletion:\n  quiet_periode_s: 3\n")
    assert cmd_check(CheckArgs(rules_file=f, skip_bundle_check=True)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{f}:2: node.port: Input should be greater than or equal to 1" + (
        " (write instead: a number of at least 1)"
    )
    assert out[1].startswith(f"{f}:4: completion.quiet_periode_s: unknown key")
    assert out[-1] == f"2 problem(s) in {f}"


def test_check_bundles_exist(tmp_path: Path) -> None:
    text = "models_dir: m\n" + TASK
    rules, _ = validate_rules_text(text)
    assert rules is not None
    missing_dir = check_bundles_exist(rules, tmp_path, text)
    assert [p.path for p in missing_dir] == ["models_dir"] and missing_dir[0].line == 1
    (tmp_path / "m" / "sequence").mkdir(parents=True)
    (tmp_path / "m" / "t1k").mkdir()
    problems = check_bundles_exist(rules, tmp_path, text)
    assert [(p.path, p.line) for p in problems] == [("tasks.gbm_pcnsl.models.0.bundle", 7)]
    assert problems[0].fix is not None and problems[0].fix.startswith("bundle: t1k")
    (tmp_path / "m" / "t1c").mkdir()
    assert check_bundles_exist(rules, tmp_path, text) == ()


def test_disabled_task_needs_no_bundle(tmp_path: Path) -> None:
    rules, _ = validate_rules_text(TASK + "    enabled: false\n")
    assert rules is not None
    (tmp_path / "models" / "sequence").mkdir(parents=True)
    assert check_bundles_exist(rules, tmp_path) == ()


def test_cmd_check_runs_bundle_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(TASK)
    (tmp_path / "models" / "sequence").mkdir(parents=True)
    assert cmd_check(CheckArgs(rules_file=f, skip_bundle_check=False)) == 1
    assert "no bundle folder 't1c'" in capsys.readouterr().out


def test_summary_names_callers_destinations_and_routes() -> None:
    text = (
        """\
node:
  ae_title: NN
  port: 104
  allowed_callers: [{ae_title: MR1, host: 10.0.0.9}]
destinations: [{kind: dicom, name: pacs, ae_title: PACS, host: 10.0.0.1, port: 11112}]
"""
        + TASK
    )
    rules, _ = validate_rules_text(text)
    assert rules is not None
    s = summarise_rules(rules)
    assert "AE title NN on 127.0.0.1:104" in s
    assert "MR1@10.0.0.9; unknown callers rejected" in s
    assert "pacs (C-STORE PACS@10.0.0.1:11112)" in s
    assert "gbm_pcnsl: glioblastoma vs primary CNS lymphoma from T1C -> t1c (weight 1)" in s


def test_receiver_processes_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """node.receiver_processes: 1 to 16 (the default when absent); `neuronode check` names a
    bad value with its line; more than one needs SO_REUSEPORT, which a system may lack."""
    import node.config as config

    f = tmp_path / "r.yaml"
    assert Rules().node.receiver_processes == config.RECEIVER_PROCESSES_DEFAULT
    f.write_text("node:\n  receiver_processes: 4\n")
    assert load_rules(f).node.receiver_processes == 4
    for bad, why in ((0, "greater than or equal to 1"), (17, "less than or equal to 16")):
        f.write_text(f"node:\n  ae_title: NEURONODE\n  receiver_processes: {bad}\n")
        assert cmd_check(CheckArgs(rules_file=f, skip_bundle_check=True)) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"{f}:3: node.receiver_processes: Input should be {why}")
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    f.write_text("node:\n  receiver_processes: 2\n")
    assert cmd_check(CheckArgs(rules_file=f, skip_bundle_check=True)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{f}:2: node.receiver_processes: several receiver processes")
    assert "SO_REUSEPORT" in out[0] and "receiver_processes: 1" in out[0]
    f.write_text("node:\n  receiver_processes: 1\n")
    assert load_rules(f).node.receiver_processes == 1
