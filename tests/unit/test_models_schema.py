"""crds/ holds the JSON Schema of every kind; it must match the pydantic models."""

import json
from pathlib import Path

from controller.models.schema import SCHEMA_KINDS, expected_files, main, stale_files

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_crds_are_up_to_date():
    stale = stale_files(CRDS)
    assert not stale, f"{stale} out of date: run python -m controller.models.schema"


def test_every_kind_has_a_schema_file():
    assert sorted(expected_files()) == sorted(f"{k.lower()}.schema.json" for k in SCHEMA_KINDS)
    assert {"network.schema.json", "workload.schema.json", "node.schema.json"} <= set(expected_files())


def test_generation_is_deterministic(tmp_path):
    assert main([str(tmp_path)]) == 0
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert main([str(tmp_path)]) == 0
    assert first == {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert main(["--check", str(tmp_path)]) == 0


def test_check_reports_a_stale_file(tmp_path, capsys):
    main([str(tmp_path)])
    (tmp_path / "network.schema.json").write_text("{}\n")
    assert main(["--check", str(tmp_path)]) == 1
    assert "network.schema.json is out of date" in capsys.readouterr().err


def test_schemas_state_the_rules_a_manifest_must_follow():
    net = json.loads(expected_files()["network.schema.json"])
    assert set(net["required"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert net["additionalProperties"] is False
    assert net["properties"]["kind"]["const"] == "Network"
    name = net["$defs"]["Metadata"]["properties"]["name"]
    assert name["maxLength"] == 40 and name["pattern"].startswith("^[a-z0-9]")
