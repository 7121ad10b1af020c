from retrofit_agent.config import AgentConfig
from retrofit_agent.metrics import AgentMetrics
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_documents_every_config_key():
    for section, field in AgentConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for name in ann.model_fields:
                assert f"`{section}.{name}`" in README, f"{section}.{name} missing from README"
        else:
            assert f"`{section}`" in README


def test_readme_documents_every_metric():
    reg = CollectorRegistry()
    AgentMetrics.create(reg)
    for family in reg.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        name = name + "_info" if family.type == "info" else name
        assert f"`{name}" in README, f"{name} missing from README"


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [l.split("#")[0].strip() for l in block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
