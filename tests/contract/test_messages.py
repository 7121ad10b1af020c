from helpers import REPO
from retrofit_agent.contract.messages import json_schema_text


def test_committed_json_schema_is_current():
    committed = (REPO / "deploy" / "messages.schema.json").read_text()
    assert committed == json_schema_text(), "run: retrofit-agent schema --output deploy/messages.schema.json"
