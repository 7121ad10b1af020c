"""The readable prompts file: groups → labels → phrases × templates (torch-free).

The toolchain encodes every ``template.format(phrase)`` with the teacher's text tower,
averages the ensemble per label and writes a bank; the daemon only sees the bank.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retrofit_agent.contract.bundle import GroupSpec, LabelSpec
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.settings import format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME = r"^[A-Za-z0-9_\-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptLabel(_Strict):
    name: str = Field(pattern=_NAME, description="Label name; tags read 'group.label'.")
    phrases: list[str] = Field(min_length=1, description="Ways to say it; each fills every template.")
    threshold: float | None = Field(None, ge=0, le=1, description="Overrides the group's threshold.")
    negative: bool = Field(False, description="Background label: competes in softmax, never a tag.")
    localize: bool = Field(False, description="Give this label regions (boxes) when the model has per-cell output.")

    @model_validator(mode="after")
    def _localize_a_tag(self) -> PromptLabel:
        if self.localize and self.negative:
            raise ValueError(f"label {self.name!r}: a negative label is never a tag, so it cannot be localized")
        return self


class PromptGroup(_Strict):
    name: str = Field(pattern=_NAME)
    threshold: float = Field(0.5, ge=0, le=1, description="Default tag threshold for the group's labels.")
    templates: list[str] | None = Field(None, description="Overrides the file's templates for this group.")
    labels: list[PromptLabel] = Field(min_length=2, description="At least two: softmax needs rivals.")


class PromptSet(_Strict):
    templates: list[str] = Field(min_length=1, description="Prompt templates; '{}' is the phrase.")
    groups: list[PromptGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> PromptSet:
        for t in self.templates + [t for g in self.groups for t in (g.templates or [])]:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for g in self.groups:
            labels = [l.name for l in g.labels]
            if len(set(labels)) != len(labels):
                raise ValueError(f"label names in group {g.name!r} must be unique")
        return self

    def prompts(self, group: PromptGroup, label: PromptLabel) -> list[str]:
        templates = group.templates or self.templates
        return [t.format(p) for p in label.phrases for t in templates]

    def group_specs(self) -> list[GroupSpec]:
        """The manifest's view: labels with thresholds and the prompts they were built from."""
        return [
            GroupSpec(
                name=g.name,
                labels=[
                    LabelSpec(
                        name=l.name,
                        threshold=g.threshold if l.threshold is None else l.threshold,
                        negative=l.negative,
                        prompts=self.prompts(g, l),
                        localize=l.localize,
                    )
                    for l in g.labels
                ],
            )
            for g in self.groups
        ]


def load_prompts(path: Path) -> PromptSet:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"prompts file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"prompts file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"prompts file {path} is not UTF-8 text (is it a prompts TOML file?)") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    try:
        return PromptSet.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"prompts ({path})")) from None
