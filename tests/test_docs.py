from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from helpers import REPO
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.metrics import AgentMetrics

README = (REPO / "README.md").read_text()


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_readme_documents_every_config_key():
    for key in _keys(AgentConfig):
        assert f"`{key}`" in README, f"{key} missing from README"


def test_readme_documents_every_campaign_key():
    from retrofit_agent.daemon.config import CampaignConfig

    for key in _keys(CampaignConfig):
        assert f"`{key}`" in README, f"campaign key {key} missing from README"


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
